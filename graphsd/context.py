"""What a node's ``run(inputs, ctx)`` may use besides its inputs."""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphsd.errors import RunInterrupted
from graphsd.events import EventCallback, Preview, Progress

#: ``Settings.compile`` values: off, one of torch.compile's modes, or fp8 (reduce-overhead with
#: the U-Net's linear layers in float8 through torchao; see graphsd.std.models.compile)
COMPILE_MODES = ("off", "reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs", "fp8")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass
class Settings:
    """Plain settings an :class:`~graphsd.engine.Engine` is built from (JSON-friendly, so an
    engine can be constructed in another process from them)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_dir: str = "output"
    models_dir: str = "models"
    # where a ComfyUI prompt's image names (LoadImage "x.png", "x.png [input]") are looked up
    input_dir: str = "input"
    plugins_dirs: list[str] = field(default_factory=list)
    allow_pickle: bool = False
    cache_budget_mb: float = 2048.0
    ram_budget_mb: float | None = None
    vram_budget_mb: float | None = None
    load_entry_points: bool = True
    max_image_pixels: int = 8192 * 8192  # LoadImage refuses larger images, from their header
    # Branch batching: independent nodes of a batchable type (UNetDenoiseLoop, VAEDecode, ...) that
    # are ready at the same time and share a model and settings run as one batched call of at most
    # this many items (also bounded by the device memory available); 0 or 1 turns batching off.
    max_batch: int = 16
    # When set, nodes read files only under these folders (and graphsd's built-in models): the
    # command line sets it for a workflow taken from a PNG, which may come from anyone.
    read_roots: list[str] | None = None
    # The compiled fast path for the U-Net and the VAE decoder (graphsd.std.models.compile):
    # "off" or a torch.compile mode (COMPILE_MODES). Off by default on every device: a first
    # compile costs about a minute per model and shape, which pays only over many images.
    compile: str = "off"
    # where compiled artefacts persist across processes (default: $TORCHINDUCTOR_CACHE_DIR when
    # set, else ~/.cache/graphsd/torch-compile)
    compile_cache_dir: str | None = None
    # torch.compile backend: "inductor" (the fast path), or "eager" / "aot_eager" to check the
    # compiled path's tracing and guards quickly (tests, debugging)
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {self.compile!r}; use one of: {', '.join(COMPILE_MODES)}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(f"unknown compile backend {self.compile_backend!r}; use one of: {', '.join(COMPILE_BACKENDS)}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass
class Context:
    """Per-node view of the engine.

    - ``models``: the ModelManager (load components, ``use`` them on the device)
    - ``device``: the compute device; ``settings``: the engine settings
    - ``output_dir`` / ``models_dir``: resolved folders
    - ``progress(value, total, **info)``: report progress (also checks for interruption)
    - ``check_interrupted()``: raise :class:`RunInterrupted` if the run was interrupted
    - ``wants_previews`` / ``preview(data, image_type)``: whether the run asked for pictures of
      work in progress, and publish one (a node makes them only when asked: they cost time)
    - ``workflow``: the workflow document being run (for embedding in saved images)
    - ``samplers``: name → sampler factory registered through ``graphsd_register_samplers``
    """

    node_id: str
    node_type: str
    run_id: str
    models: Any
    device: torch.device
    settings: Settings
    workflow: dict[str, Any]
    samplers: dict[str, Any]
    emit: EventCallback
    interrupt_flag: threading.Event
    files: list[str] = field(default_factory=list)
    #: folders of files the plugins ship (always readable, see ``graphsd_shipped_folders``)
    shipped_folders: list[Path] = field(default_factory=list)
    #: the run asked for previews (``Engine.run(..., previews=True)``): see :meth:`preview`
    wants_previews: bool = False

    @property
    def output_dir(self) -> Path:
        return Path(self.settings.output_dir)

    @property
    def models_dir(self) -> Path:
        return Path(self.settings.models_dir)

    def check_interrupted(self) -> None:
        if self.interrupt_flag.is_set():
            raise RunInterrupted(self.node_id)

    def progress(self, value: int, total: int, **info: Any) -> None:
        self.emit(Progress(run_id=self.run_id, node_id=self.node_id, value=value, total=total, info=info))
        self.check_interrupted()

    def preview(self, data: bytes, image_type: str = "image/jpeg") -> None:
        """Publish an encoded picture (JPEG or PNG bytes, small: a client shows it while the node
        works) as a :class:`~graphsd.events.Preview` event; does nothing in a run that did not ask
        for previews, so a node may call it unconditionally but should skip making the picture
        when ``wants_previews`` is false."""
        if self.wants_previews:
            self.emit(
                Preview(run_id=self.run_id, node_id=self.node_id, image_type=image_type, image=base64.b64encode(data).decode("ascii"))
            )

    def readable(self, path: str | Path, field: str) -> Path:
        """``path`` resolved, after checking it lies under ``settings.read_roots`` (when set) or
        the folders plugins ship; raises NodeError naming the field otherwise."""
        from graphsd.errors import NodeError

        resolved = Path(path).resolve()
        roots = self.settings.read_roots
        if roots is None:
            return resolved
        allowed = [Path(r).resolve() for r in roots] + list(self.shipped_folders)
        if not any(resolved == root or root in resolved.parents for root in allowed):
            raise NodeError(
                f"'{path}' lies outside the folders this workflow may read ({', '.join(str(r) for r in allowed)}): "
                "a workflow taken from an image, or sent to graphsd serve, is confined to them (for an image's "
                "workflow you trust: run it with --trust-workflow; on a server: put the file in its models or input folder)",
                field=field,
            )
        return resolved

    def wrote_file(self, path: str | Path) -> None:
        """Record a file this node wrote (shown by the CLI, returned by the API)."""
        self.files.append(str(path))
