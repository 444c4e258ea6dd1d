"""graphsd's standard library: the Stable Diffusion stack (nodes, model families, file formats,
samplers, text encoding, ComfyUI import) as graphsd's first plugin, registered through the same
hooks as any third-party plugin. The engine core imports nothing from this package; it loads it by
name (:data:`graphsd.plugins.BUILTIN_PLUGINS`).

Each module of :mod:`graphsd.std.nodes` is a plugin of its own with its own
``graphsd_register_nodes`` (so a problem in one of them is reported like a broken plugin and the
others keep working); this module registers the socket types, the samplers, the folders of shipped
files, the ComfyUI importer (API prompts and the editor's UI-format files) and what ``graphsd serve`` needs to speak ComfyUI's API (the
ComfyUI classes it imports, in ``/object_info`` shape, and the ComfyUI names of the socket types).
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
def graphsd_import_workflow(data: Any, nodes: dict[str, Any], settings: Any) -> dict | None:
    from graphsd.std.comfy import is_comfy_prompt, translate, unwrap
    from graphsd.std.comfy_ui import class_definitions, is_ui_workflow, ui_to_prompt
    from graphsd.std.nodes.comfy_core import PREVIEW_FOLDER

    data = unwrap(data)  # a request body around the workflow
    if is_ui_workflow(data):  # the ComfyUI editor's file: first the API prompt the frontend would send
        data = ui_to_prompt(data, class_definitions(nodes))
    if not is_comfy_prompt(data):
        return None
    # ComfyUI's folders on the command line: the input folder, the output folder, and PreviewImage's temp/ in it
    folders = {"input": settings.input_dir, "output": settings.output_dir, "temp": Path(settings.output_dir) / PREVIEW_FOLDER}
    return translate(data, nodes, folders=folders, confine=False)[0]


@hookimpl
def graphsd_comfy_prompt(prompt: dict[str, Any], nodes: dict[str, Any], input_dir: str, folders: dict[str, str]) -> dict[str, Any] | None:
    from graphsd.std.comfy import is_comfy_prompt, translate

    if not is_comfy_prompt(prompt):
        return None
    workflow, origins = translate(prompt, nodes, input_dir, folders=folders, confine=True)
    return {"workflow": workflow, "origins": origins}


@hookimpl
def graphsd_comfy_nodes(models_dir: str, input_dir: str) -> dict[str, dict[str, Any]]:
    from graphsd.std.comfy import object_info

    return object_info(models_dir, input_dir)


@hookimpl
def graphsd_comfy_types() -> dict[str, str]:
    from graphsd.std.comfy import COMFY_TYPES

    return dict(COMFY_TYPES)


@hookimpl
def graphsd_register_types() -> list[type[Socket]]:
    return list(BUILTIN_SOCKET_TYPES)


@hookimpl
def graphsd_register_samplers() -> dict[str, Any]:
    from graphsd.std.sampling.schedulers import SAMPLERS

    return dict(SAMPLERS)
