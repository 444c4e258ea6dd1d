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

    from graphsd.events import Event
    from graphsd.node import Node
    from graphsd.types import Socket

PROJECT = "graphsd"
hookspec = pluggy.HookspecMarker(PROJECT)
#: Marks a plugin's hook implementations (``from graphsd import hookimpl``). Only marked
#: functions are hooks: an unmarked ``graphsd_*`` function, or a marked one whose name is no
#: hook below, is reported as a warning naming the plugin and the function.
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---- registration (called once, when an Engine starts) -------------------------------------
@hookspec
def graphsd_register_nodes() -> list[type[Node]]:
    """Return the node classes this plugin provides.

    Each class needs a ``type`` name unique across all plugins; a clash is reported as a
    warning naming both plugins, and the node registered first wins."""


@hookspec
def graphsd_register_types() -> list[type[Socket]]:
    """Return the socket types (subclasses of :class:`graphsd.types.Socket`) this plugin adds,
    so that ``graphsd nodes`` can list them and workflows can name them."""


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
def graphsd_import_workflow(data: Any) -> dict[str, Any] | None:
    """Translate a document in a foreign format (already parsed from JSON/YAML/PNG) into a graphsd
    workflow dict, or return None when it is not in this plugin's format. The first non-None
    result is used; raise :class:`graphsd.errors.WorkflowError` for a document in your format
    that cannot be translated. :mod:`graphsd.std` implements it for ComfyUI API prompts."""


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
