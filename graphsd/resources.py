"""How much memory a node is about to need, checked before it allocates it.

The estimates are lower bounds made of the tensors a step cannot do without, so a refusal is
never wrong: work that passes may still fail later, but work that is refused could not have
run. What is available is the smallest of what the system reports (``MemAvailable``), the
process's data-size limit (``ulimit -d``) and its cgroup's memory limit (containers); on a CUDA
device, the free device memory plus what torch's caching allocator holds unused.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import torch

from graphsd.errors import NodeError

GiB = 1024**3


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def _rlimit_available() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    if soft == resource.RLIM_INFINITY:
        return None
    try:  # what the limit already counts: the data and stack segments (statm field "data")
        statm = Path(f"/proc/{os.getpid()}/statm").read_text().split()
        used = int(statm[5]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        used = 0
    return soft - used


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None when nothing says)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    known = [v for v in (_meminfo_available(), _cgroup_available(), _rlimit_available()) if v is not None]
    return min(known) if known else None


def require_memory(device: torch.device, need: int, what: str, hint: str, field: str | None = None) -> None:
    """Raise NodeError when ``need`` bytes (a lower bound for ``what``) cannot be had on ``device``."""
    have = available_memory(device)
    if have is not None and need > have:
        raise NodeError(
            f"{what} needs at least {need / GiB:.1f} GiB on {device.type}, but {max(have, 0) / GiB:.1f} GiB is available; {hint}",
            field=field,
        )


def latent_working_set(shape: tuple[int, ...]) -> int:
    """Bytes the denoise loop holds for a latent of ``shape`` at the very least: the noise, the
    latent, the CFG-doubled U-Net input and output, the guided prediction and the sampler's
    next sample, eight fp32 copies."""
    return 8 * 4 * _numel(shape)


def feature_map_bytes(batch: int, channels: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Bytes of one ResNet block at full resolution: its input, its normalised activation and
    its output, three feature maps of ``channels`` at ``height`` × ``width``."""
    return 3 * batch * channels * height * width * torch.empty((), dtype=dtype).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
