"""Output paths confined to the output directory, and atomic, non-overwriting writes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from graphsd.errors import NodeError


def file_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of a file's or folder's content, for cache keys: the resolved path and the
    relative name, size and modification time of every file in it (no hashing of contents), so it
    changes when a file is replaced. ``missing:<path>`` when nothing is there."""
    root = Path(path).resolve()
    if not root.exists():
        return f"missing:{root}"
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    digest = hashlib.sha256(str(root).encode())
    for f in files:
        st = f.stat()
        name = f.relative_to(root) if root.is_dir() else f.name
        digest.update(f"\0{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def safe_output_path(output_dir: str | Path, name: str, field: str = "prefix") -> Path:
    """``output_dir / name`` after checking that it stays inside ``output_dir``: no absolute
    path, no ``..`` component, and no symlink that leads outside. Raises NodeError."""
    if not name or name.strip() != name:
        raise NodeError(f"'{name}' is not a usable file name (empty or surrounded by spaces)", field=field)
    rel = Path(name)
    if rel.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise NodeError(f"'{name}' is an absolute path; outputs are written inside the output directory only", field=field)
    if ".." in rel.parts or "\\" in name:
        raise NodeError(f"'{name}' leaves the output directory ('..' or '\\' is not allowed)", field=field)
    root = Path(output_dir).resolve()
    target = (root / rel).resolve()
    if target != root and root not in target.parents:
        raise NodeError(f"'{name}' resolves outside the output directory (through a symbolic link)", field=field)
    return root / rel


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place, so a
    reader (or an interrupted run) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_numbered(directory: Path, prefix: str, suffix: str, write: Callable[[Path], None], start: int = 1) -> Path:
    """Write a new file ``<prefix>_<NNNNN><suffix>`` in ``directory`` without ever replacing an
    existing one (the number is claimed with a hard link, which fails if the name exists)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".graphsd-", suffix=suffix + ".tmp", dir=directory)
    os.close(fd)
    try:
        write(Path(tmp))
        existing = [p.name for p in directory.glob(f"{Path(prefix).name}_*{suffix}")]
        n = max([start - 1] + [_number(e, Path(prefix).name, suffix) for e in existing]) + 1
        while True:
            final = directory / f"{Path(prefix).name}_{n:05d}{suffix}"
            try:
                os.link(tmp, final)
                return final
            except FileExistsError:
                n += 1
    finally:
        Path(tmp).unlink(missing_ok=True)


def _number(name: str, prefix: str, suffix: str) -> int:
    core = name[len(prefix) + 1 : len(name) - len(suffix)]
    return int(core) if core.isdigit() else 0
