"""Every pluggy hook graphsd calls, grouped by phase. Hooks are always called with keyword
arguments, so a hook may grow new arguments without breaking implementations.

Implement a hook in a plugin module::

    from graphsd import hookimpl

    @hookimpl
    def graphsd_register_nodes():
        return [MyNode]

and expose the module through the ``graphsd`` entry-point group, or drop it into a plugins
directory (``--plugins-dir`` / ``GRAPHSD_PLUGINS_DIR``). The built-in nodes register through
these same hooks: :mod:`graphsd.std` (the Stable Diffusion stack) is graphsd's first plugin, and
each module of :mod:`graphsd.std.nodes` is a plugin with its own ``graphsd_register_nodes``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    from graphsd.context import Settings
    from graphsd.events import Event
    from graphsd.node import Node
    from graphsd.types import Socket

PROJECT = "graphsd"
hookspec = pluggy.HookspecMarker(PROJECT)
#: Marks a plugin's hook implementations (``from graphsd import hookimpl``). Only marked
#: functions are hooks: an unmarked ``graphsd_*`` function, or a marked one whose name is no
#: hook below, is reported as a warning naming the plugin and the function.
hookimpl = pluggy.HookimplMarker(PROJECT)
#: How ``graphsd serve`` names a graphsd node type in ComfyUI's ``/object_info`` when a ComfyUI
#: class of the same name exists (``graphsd.SaveImage`` beside ComfyUI's ``SaveImage``); a
#: ``graphsd_comfy_prompt`` implementation accepts both spellings of a graphsd type.
COMFY_NATIVE_PREFIX = "graphsd."


# ---- registration (called once, when an Engine starts) -------------------------------------
@hookspec
def graphsd_register_nodes() -> list[type[Node]]:
    """Return the node classes this plugin provides.

    Each class needs a ``type`` name unique across all plugins; a clash is reported as a
    warning naming both plugins, and the node registered first wins."""


@hookspec
def graphsd_register_types() -> list[type[Socket]]:
    """Return the socket types (subclasses of :class:`graphsd.types.Socket`) this plugin adds.
    A node whose input or output uses a socket type that no plugin registers is named in a
    warning when the engine starts (``Registry.types`` is the table of known types by name)."""


@hookspec
def graphsd_register_samplers() -> dict[str, Any]:
    """Return ``{name: factory}`` for samplers usable by ``UNetDenoiseLoop``. A factory is
    called as ``factory(scheduler_config=dict, schedule=str)`` and returns a diffusers-style
    scheduler (``set_timesteps``, ``scale_model_input``, ``step``, ``add_noise``)."""


@hookspec
def graphsd_shipped_folders() -> list[Path]:
    """Return folders of files this plugin ships (models, configs). Nodes may always read them,
    even when a workflow is confined to ``Settings.read_roots``."""


# ---- reading workflows ----------------------------------------------------------------------
@hookspec(firstresult=True)
def graphsd_import_workflow(data: Any, nodes: dict[str, type[Node]], settings: Settings) -> dict[str, Any] | None:
    """Translate a document in a foreign format (already parsed from JSON/YAML/PNG) into a graphsd
    workflow dict, or return None when it is not in this plugin's format. ``nodes`` are the
    registered node classes by type (a foreign document may name graphsd nodes too); ``settings``
    are the engine's (folders where the document's file names resolve: ``input_dir``,
    ``output_dir``, ``models_dir``). The first non-None result is used; raise
    :class:`graphsd.errors.WorkflowError` for a document in your format that cannot be translated.
    :mod:`graphsd.std` implements it for ComfyUI API prompts and UI-format files."""


# ---- the ComfyUI-compatible server (graphsd serve) --------------------------------------------
@hookspec
def graphsd_comfy_nodes(models_dir: str, input_dir: str) -> dict[str, dict[str, Any]]:
    """Return ``{ComfyUI class name: entry}`` for the ComfyUI node classes this plugin's
    ``graphsd_comfy_prompt`` translates, each entry in the shape of ComfyUI's ``/object_info``
    (ComfyUI's input names and types, widget defaults and ranges, choices such as the models in
    ``models_dir`` or the images in ``input_dir``, ``output``, ``category``, ``python_module``).
    Called for every ``/object_info`` request, so choices stay current. The server lists these
    beside every registered graphsd node; on a name clash the ComfyUI class keeps the name and the
    graphsd node is listed as ``graphsd.<type>`` (:data:`COMFY_NATIVE_PREFIX`)."""


@hookspec
def graphsd_comfy_types() -> dict[str, str]:
    """Return ``{graphsd socket type name: ComfyUI type name}`` for the socket types that carry the
    same values as a ComfyUI type (``{"UNet": "MODEL", "Latent": "LATENT"}``): the server names
    graphsd node inputs and outputs by these in ``/object_info`` so that the frontend links them
    to ComfyUI classes. Other socket types keep their graphsd names."""


@hookspec(firstresult=True)
def graphsd_comfy_prompt(
    prompt: dict[str, Any], nodes: dict[str, type[Node]], input_dir: str, folders: dict[str, str]
) -> dict[str, Any] | None:
    """Translate a ComfyUI API prompt that ``POST /prompt`` received: return
    ``{"workflow": <graphsd workflow dict>, "origins": {<graphsd node id>: {"id": <prompt node
    id>, "class_type": ..., "inputs": {<graphsd input>: <prompt input>}}}}``, so the server can
    report validation errors and run events on the prompt's own nodes and inputs. The prompt may
    name graphsd node types (``class_type`` = the type or ``graphsd.<type>``, inputs by graphsd
    names, a link ``[id, i]`` naming the i-th declared output). File names in the prompt lie in
    ``input_dir`` (images) or the models folder; ``folders`` maps ComfyUI's folder types
    (``input``, ``output``, ``temp``) to the server's folders, for image names annotated with one
    (``"x.png [output]"``). Raise :class:`graphsd.errors.WorkflowError` with
    issues on the prompt's node ids and input names; return None if you cannot read it."""


# ---- execution (called during each run) ----------------------------------------------------
@hookspec
def graphsd_before_node(node_id: str, node_type: str, inputs: dict[str, Any]) -> None:
    """Called just before a node runs (not when its outputs come from the cache), with its
    resolved input values. Must not modify them."""


@hookspec
def graphsd_after_node(node_id: str, node_type: str, outputs: dict[str, Any], duration_s: float) -> None:
    """Called after a node ran successfully, with its outputs and wall time in seconds."""


@hookspec
def graphsd_event(event: Event) -> None:
    """Called for every event of every run (see :mod:`graphsd.events`): run start, node
    start/cached/done/error, progress, cache and model decisions, interruption, run done.
    Observers only; an exception raised here is reported and ignored."""
