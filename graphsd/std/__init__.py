"""graphsd's standard library: the Stable Diffusion stack (nodes, model families, file formats,
samplers, text encoding, ComfyUI import) as graphsd's first plugin, registered through the same
hooks as any third-party plugin. The engine core imports nothing from this package; it loads it by
name (:data:`graphsd.plugins.BUILTIN_PLUGINS`).

Each module of :mod:`graphsd.std.nodes` is a plugin of its own with its own
``graphsd_register_nodes`` (so a problem in one of them is reported like a broken plugin and the
others keep working); this module registers the socket types, the samplers, the folders of shipped
files and the ComfyUI prompt importer.
"""

from __future__ import annotations

import pkgutil
from pathlib import Path
from typing import Any

from graphsd.hookspecs import hookimpl
from graphsd.types import BUILTIN_SOCKET_TYPES, Socket

_HERE = Path(__file__).resolve().parent


def plugin_modules() -> list[str]:
    """The modules of this package that are plugins of their own (the node modules)."""
    return sorted(f"{__name__}.nodes.{m.name}" for m in pkgutil.iter_modules([str(_HERE / "nodes")]))


@hookimpl
def graphsd_shipped_folders() -> list[Path]:
    from graphsd.std.models.loading import builtin_models_dir

    return [builtin_models_dir()]


@hookimpl
def graphsd_import_workflow(data: Any) -> dict | None:
    from graphsd.std.comfy import comfy_to_workflow, is_comfy_prompt

    return comfy_to_workflow(data) if is_comfy_prompt(data) else None


@hookimpl
def graphsd_register_types() -> list[type[Socket]]:
    return list(BUILTIN_SOCKET_TYPES)


@hookimpl
def graphsd_register_samplers() -> dict[str, Any]:
    from graphsd.std.sampling.schedulers import SAMPLERS

    return dict(SAMPLERS)
