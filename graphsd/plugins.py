"""Plugin discovery and the node registry.

Sources, in order: graphsd's own plugins (:data:`BUILTIN_PLUGINS`, loaded by name: the engine
core imports nothing from them), the ``graphsd`` entry-point group of installed
packages, then every ``*.py`` file or package in the plugins directories (``--plugins-dir`` and
the ``GRAPHSD_PLUGINS_DIR`` environment variable, ``os.pathsep``-separated). A plugin that fails
to import or to register, or that registers a node name already taken, produces a warning that
names the plugin and the problem; the engine keeps working with everything else.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from graphsd import hookspecs
from graphsd.hookspecs import PROJECT
from graphsd.node import Node, socket_class
from graphsd.types import Socket

ENTRY_POINT_GROUP = "graphsd"
PLUGINS_DIR_ENV = "GRAPHSD_PLUGINS_DIR"
#: graphsd's own plugin packages, loaded first. A package's ``plugin_modules()`` (if any) names
#: its submodules that are plugins of their own.
BUILTIN_PLUGINS = ("graphsd.std",)


@dataclass
class PluginInfo:
    name: str
    source: str  # "builtin", "entry point <dist>", or the file path
    nodes: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Registry:
    """What the plugins provided: node classes, socket types and samplers by name."""

    nodes: dict[str, type[Node]] = field(default_factory=dict)
    node_plugin: dict[str, str] = field(default_factory=dict)
    types: dict[str, type[Socket]] = field(default_factory=dict)
    samplers: dict[str, Any] = field(default_factory=dict)
    shipped_folders: list[Path] = field(default_factory=list)
    plugins: list[PluginInfo] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _short_error(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _import_path(path: Path) -> ModuleType:
    """Import a plugin file or package directory under a private module name."""
    target = path / "__init__.py" if path.is_dir() else path
    name = f"graphsd_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, target, submodule_search_locations=[str(path)] if path.is_dir() else None)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {target}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def plugin_dirs(extra: list[str] | tuple[str, ...] = ()) -> list[Path]:
    dirs = [Path(d) for d in extra]
    env = os.environ.get(PLUGINS_DIR_ENV, "")
    dirs += [Path(d) for d in env.split(os.pathsep) if d]
    return dirs


def _missing_dir(d: Path) -> ModuleType:
    raise FileNotFoundError(f"plugins directory {d} does not exist")


def _candidates(plugins_dirs: list[Path], load_entry_points: bool) -> list[tuple[str, str, Any]]:
    """(name, source, loader) for every plugin to try, builtin first."""
    found: list[tuple[str, str, Any]] = []
    for package in BUILTIN_PLUGINS:
        module = importlib.import_module(package)
        found.append((package, "builtin", lambda m=module: m))
        for name in getattr(module, "plugin_modules", list)():
            found.append((name, "builtin", lambda name=name: importlib.import_module(name)))
    if load_entry_points:
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep.dist, "name", "?")
            found.append((ep.name, f"entry point of {dist}", ep.load))
    for d in plugins_dirs:
        if not d.is_dir():
            found.append((d.name, str(d), lambda d=d: _missing_dir(d)))
            continue
        for path in sorted(d.iterdir()):
            if path.name.startswith(("_", ".")):
                continue
            if (path.suffix == ".py" and path.is_file()) or (path / "__init__.py").is_file():
                found.append((path.stem, str(path), lambda p=path: _import_path(p)))
    return found


def _call_one(pm: pluggy.PluginManager, plugin: Any, hook: str) -> list[Any]:
    """The results of ``plugin``'s implementation of the registration ``hook`` (pluggy's
    parsed implementation, called with keyword arguments like any hook call)."""
    impls = [impl for impl in getattr(pm.hook, hook).get_hookimpls() if impl.plugin is plugin]
    results = [impl.function() for impl in impls]
    return [r for r in results if r is not None]


class _PluginManager(pluggy.PluginManager):
    """pluggy's plugin manager, quicker to register a module: pluggy inspects every attribute of
    a plugin (``inspect.getattr_static`` each, ~1,200 for graphsd's built-in modules with their
    imports); a module attribute that neither is named like a hook nor carries the ``@hookimpl``
    mark (a function named otherwise may still implement a hook through ``specname``) is passed
    over from the module's dictionary instead."""

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        if isinstance(plugin, ModuleType) and not name.startswith(f"{PROJECT}_"):
            value = plugin.__dict__.get(name)
            if not (callable(value) and hasattr(value, f"{PROJECT}_impl")):
                return None
        return super().parse_hookimpl_opts(plugin, name)


HOOK_NAMES = sorted(name for name in dir(hookspecs) if name.startswith(f"{PROJECT}_"))


def _hook_problems(pm: pluggy.PluginManager, name: str, plugin: Any) -> list[str]:
    """What pluggy will not call in ``plugin``: a ``graphsd_*`` function without ``@hookimpl``,
    or one that names no hook (what ``PluginManager.check_pending`` finds for marked ones, here
    for every such function, each reported instead of the first raised)."""
    problems = []
    for attr in sorted(dir(plugin)):
        if not attr.startswith(f"{PROJECT}_") or not callable(getattr(plugin, attr, None)):
            continue
        if attr not in HOOK_NAMES:
            close = difflib.get_close_matches(attr, HOOK_NAMES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"plugin '{name}': {attr} is not a graphsd hook{hint}, so it is never called")
        elif pm.parse_hookimpl_opts(plugin, attr) is None:
            problems.append(
                f"plugin '{name}': {attr} is not decorated with @hookimpl (from graphsd import hookimpl), so it is never called"
            )
    return problems


def load_plugins(plugins_dirs: list[str] | tuple[str, ...] = (), load_entry_points: bool = True) -> tuple[pluggy.PluginManager, Registry]:
    """Build a plugin manager and the registry of nodes/types/samplers. Never raises for a
    broken plugin: problems end up in ``registry.warnings`` and ``registry.plugins``; so do
    misspelt and unmarked hooks."""
    pm = _PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    reg = Registry()
    for name, source, loader in _candidates(plugin_dirs(plugins_dirs), load_entry_points):
        info = PluginInfo(name=name, source=source)
        reg.plugins.append(info)
        try:
            module = loader()
            if pm.is_registered(module):
                continue
            pm.register(module, name=f"{name}@{source}")
            reg.warnings.extend(_hook_problems(pm, name, module))
            types_ = [t for r in _call_one(pm, module, "graphsd_register_types") for t in r]
            nodes = [n for r in _call_one(pm, module, "graphsd_register_nodes") for n in r]
            samplers = {k: v for r in _call_one(pm, module, "graphsd_register_samplers") for k, v in r.items()}
            shipped = [Path(p) for r in _call_one(pm, module, "graphsd_shipped_folders") for p in r]
        except Exception as exc:  # a broken plugin must not take the engine down
            info.error = _short_error(exc)
            reg.warnings.append(f"plugin '{name}' ({source}) failed to load: {info.error}")
            continue
        for t in types_:
            if isinstance(t, type) and issubclass(t, Socket):
                reg.types.setdefault(t.type_name(), t)
            else:
                reg.warnings.append(f"plugin '{name}' registered {t!r} as a socket type, but it is not a graphsd.types.Socket subclass")
        for node in nodes:
            problem = _node_problem(node)
            if problem:
                reg.warnings.append(f"plugin '{name}' ({source}): {problem}; node skipped")
                continue
            if node.type in reg.nodes:
                reg.warnings.append(
                    f"plugin '{name}' ({source}) registers node type '{node.type}', already registered by "
                    f"plugin '{reg.node_plugin[node.type]}'; keeping the first one"
                )
                continue
            reg.nodes[node.type] = node
            reg.node_plugin[node.type] = name
            info.nodes.append(node.type)
        for sname, factory in samplers.items():
            reg.samplers.setdefault(sname, factory)
        reg.shipped_folders.extend(p.resolve() for p in shipped)
    reg.warnings.extend(_unregistered_sockets(reg))
    return pm, reg


def _unregistered_sockets(reg: Registry) -> list[str]:
    """A node whose input or output is a socket type that no plugin registered (so ``graphsd
    nodes``, docs and the server cannot list it by name), once per type."""
    seen: dict[str, str] = {}
    for name, node in reg.nodes.items():
        for field_info in [*node.input_fields().values(), *node.output_fields().values()]:
            sock = socket_class(field_info.annotation)
            if sock is not None and reg.types.get(sock.type_name()) is not sock:
                seen.setdefault(sock.type_name(), name)
    return [
        f"plugin '{reg.node_plugin[node]}': node '{node}' uses the socket type '{sock}', which no plugin registers "
        "(return it from graphsd_register_types)"
        for sock, node in sorted(seen.items())
    ]


def _node_problem(node: Any) -> str | None:
    if not (isinstance(node, type) and issubclass(node, Node)):
        return f"{node!r} is not a graphsd.Node subclass"
    if not isinstance(getattr(node, "type", None), str) or not node.type:
        return f"node class {node.__name__} has no 'type' name"
    if node.run is Node.run:
        return f"node '{node.type}' does not implement run()"
    return None
