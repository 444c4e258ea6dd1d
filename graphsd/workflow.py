"""Workflow documents: reading (YAML, JSON, ComfyUI API prompts, PNGs that carry a workflow),
the versioned schema, and parameter substitution.

Schema (YAML and JSON are the same model)::

    version: 1
    params: {seed: 42, prompt: "a red circle"}    # defaults; override with --set seed=7
    nodes:
      <node id>: {type: <NodeType>, inputs: {<name>: <literal> | "@<node id>.<output>"}}

Strings: ``"@node.output"`` is a link; ``"${name}"`` (the whole string) is the param's value
with its type; ``"... ${name} ..."`` interpolates it as text; a leading ``"@@"`` stands for a
literal ``"@"`` and ``"$${"`` for a literal ``"${"``. So a link and a literal string can never be
confused.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from graphsd.errors import Issue, WorkflowError

PNG_WORKFLOW_KEY = "graphsd_workflow"
NODE_ID_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
LINK_RE = re.compile(r"^@([A-Za-z0-9_\-]+)\.([A-Za-z_][A-Za-z0-9_]*)$")
PARAM_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
WHOLE_PARAM_RE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


class NodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = Field(description="Registered node type name")
    inputs: dict[str, Any] = Field(default_factory=dict)


class WorkflowDoc(BaseModel):
    """The validated shape of a workflow document (before node-level validation)."""

    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    params: dict[str, Any] = Field(default_factory=dict)
    nodes: dict[str, NodeSpec]


@dataclass(frozen=True)
class Link:
    node: str
    output: str

    def __str__(self) -> str:
        return f"@{self.node}.{self.output}"


# ---- reading ------------------------------------------------------------------------------
#: Largest number of values a YAML document may stand for once its aliases are expanded (a
#: "billion laughs" document has a few lines and 10⁹ values).
MAX_YAML_VALUES = 100_000
#: Deepest nesting of lists and mappings a workflow document may have (real ones have ~5).
MAX_NESTING = 64


class _BoundedYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing documents whose aliases expand beyond MAX_YAML_VALUES
    values or that nest deeper than MAX_NESTING (checked while the node graph is composed,
    before any Python object is built)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise _TooLarge(f"is nested more than {MAX_NESTING} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        _check_yaml_size(node)
        return super().construct_document(node)


def _check_yaml_size(root: yaml.Node) -> None:
    """Refuse a node graph that stands for more than MAX_YAML_VALUES values (each alias counts
    as a full copy of its anchor); sizes are memoised per node, so this is linear in the text."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = _yaml_children(node)
        if children_done or not children:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_VALUES:
                raise _TooLarge(f"expands to more than {MAX_YAML_VALUES:,} values (YAML aliases repeat their anchor)")
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


class _TooLarge(Exception):
    pass


def _json_depth_ok(text: str) -> bool:
    """Whether the brackets of a JSON text nest at most MAX_NESTING deep (a linear scan that
    skips strings), so a hostile document never reaches the recursive decoder."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _parse_text(text: str, suffix: str, source: str) -> Any:
    if suffix == ".json":
        if not _json_depth_ok(text):
            raise WorkflowError(
                [Issue(f"{source}: the JSON is nested more than {MAX_NESTING} levels deep; it is not a workflow", code="syntax")]
            )
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkflowError(
                [Issue(f"{source}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", code="syntax")]
            ) from None
    try:
        return yaml.load(text, Loader=_BoundedYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except _TooLarge as exc:
        raise WorkflowError([Issue(f"{source}: the YAML document {exc}; it is not a workflow", code="syntax")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise WorkflowError([Issue(f"{source}: malformed YAML{where}: {problem}", code="syntax")]) from None


def read_png_workflow(path: Path) -> Any:
    """The workflow a PNG carries: graphsd's own text chunk, else ComfyUI's ``prompt`` (the API
    prompt), else ComfyUI's ``workflow`` (the editor's graph, for the plugins' importers)."""
    import warnings

    from PIL import Image as PILImage

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            with PILImage.open(path) as im:
                text = dict(getattr(im, "text", {}) or {})
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as exc:
        # ValueError: a text chunk larger than PIL's limit (a decompression bomb)
        raise WorkflowError([Issue(f"{path}: not a readable PNG image ({exc})", code="syntax")]) from None
    for key in (PNG_WORKFLOW_KEY, "prompt", "workflow"):
        if key in text:
            return _parse_text(text[key], ".json", f"{path} (PNG text '{key}')")
    raise WorkflowError(
        [
            Issue(
                f"{path}: this PNG carries no workflow (no text chunk '{PNG_WORKFLOW_KEY}', or ComfyUI's 'prompt' or 'workflow')",
                code="syntax",
            )
        ]
    )


def read_document(source: str | Path | dict, importer: Callable[[Any], dict | None] | None = None) -> dict:
    """Read a workflow from a path (YAML, JSON, PNG) or take a dict. A document in another format
    is translated by ``importer`` (the plugins' ``graphsd_import_workflow`` hook: ComfyUI API
    prompts). Returns a plain document dict (not yet validated against node types)."""
    if isinstance(source, dict):
        data: Any = copy.deepcopy(source)
        origin = "<workflow>"
    else:
        path = Path(source)
        origin = str(path)
        if not path.is_file():
            raise WorkflowError([Issue(f"workflow file {path} does not exist", code="missing_file")])
        if path.suffix.lower() == ".png":
            data = read_png_workflow(path)
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise WorkflowError([Issue(f"{path}: cannot read as UTF-8 text ({exc})", code="syntax")]) from None
            data = _parse_text(text, path.suffix.lower(), origin)
    if importer is not None and (imported := importer(data)) is not None:
        data = imported
    if not isinstance(data, dict):
        raise WorkflowError(
            [Issue(f"{origin}: a workflow must be a mapping with 'version' and 'nodes', got {type(data).__name__}", code="schema")]
        )
    return data


def _schema_issues(exc: ValidationError) -> list[Issue]:
    issues = []
    for err in exc.errors():
        loc = [str(x) for x in err["loc"]]
        node = loc[1] if len(loc) >= 2 and loc[0] == "nodes" else None
        field = None
        if node is not None and len(loc) >= 4 and loc[2] == "inputs":
            field = loc[3]
        where = ".".join(loc) or "document"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown key '{loc[-1]}'"
        issues.append(Issue(f"{where}: {msg}", node=node, field=field, code="schema"))
    return issues


def parse_document(data: dict) -> WorkflowDoc:
    if isinstance(data.get("nodes"), dict):
        data = {**data, "nodes": {str(k): v for k, v in data["nodes"].items()}}
    try:
        return WorkflowDoc.model_validate(data)
    except ValidationError as exc:
        raise WorkflowError(_schema_issues(exc)) from None


# ---- params and links ---------------------------------------------------------------------
class SetText(str):
    """A param value as typed on the command line (``--set key=value``): converted to the type
    of the param's declared default when the workflow is read (:func:`convert_set_value`)."""


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def convert_set_value(name: str, text: str, default: Any) -> Any:
    """``text`` as a value for the param ``name`` whose default is ``default``: a string param
    takes the text verbatim (``#``, quotes, an empty value and all); numbers and booleans are
    parsed; a param without a typed default takes a YAML scalar. Raises ValueError saying
    what was expected."""
    if isinstance(default, bool):
        if text.strip().lower() in _TRUE | _FALSE:
            return text.strip().lower() in _TRUE
        raise ValueError(f"param '{name}' is a boolean (true or false), got {text!r}")
    if isinstance(default, (int, float)):
        for number in (int, float):  # an int param given 7.5 stays 7.5: the node's field decides
            try:
                return number(text.strip())
            except ValueError:
                pass
        raise ValueError(f"param '{name}' is a number, got {text!r}")
    if isinstance(default, str):
        return str(text)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return str(text)
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(text)


def merge_params(doc: WorkflowDoc, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The workflow's params with ``overrides`` applied (command-line text converted to each
    param's type). Every unknown name or unconvertible value is reported at once."""
    params = dict(doc.params)
    issues = []
    for key, value in (overrides or {}).items():
        if key not in params:
            known = ", ".join(sorted(params)) or "none"
            issues.append(
                Issue(f"no param named '{key}' in this workflow (params: {known})", code="unknown_param", hint="declare it under 'params:'")
            )
            continue
        if isinstance(value, SetText):
            try:
                value = convert_set_value(key, value, params[key])
            except ValueError as exc:
                issues.append(Issue(str(exc), code="bad_param"))
                continue
        params[key] = value
    if issues:
        raise WorkflowError(issues)
    return params


def resolve_value(value: Any, params: dict[str, Any], node: str, field: str, issues: list[Issue]) -> Any:
    """Turn one input value into a Link, a literal with params substituted, or report issues."""
    if isinstance(value, str):
        if value.startswith("@@"):
            return value[1:]
        if value.startswith("@"):
            m = LINK_RE.match(value)
            if not m:
                issues.append(
                    Issue(
                        f"'{value}' is not a valid link",
                        node=node,
                        field=field,
                        code="bad_link",
                        hint="write links as '@<node id>.<output>'; start a literal string with '@@' for a leading '@'",
                    )
                )
                return None
            return Link(m.group(1), m.group(2))
        whole = WHOLE_PARAM_RE.match(value)
        if whole:
            name = whole.group(1)
            if name not in params:
                issues.append(
                    Issue(
                        f"param '${{{name}}}' is not defined", node=node, field=field, code="unknown_param", hint="add it under 'params:'"
                    )
                )
                return None
            return params[name]

        def sub(m: re.Match) -> str:
            name = m.group(1)
            if name not in params:
                issues.append(
                    Issue(
                        f"param '${{{name}}}' is not defined", node=node, field=field, code="unknown_param", hint="add it under 'params:'"
                    )
                )
                return m.group(0)
            return str(params[name])

        return PARAM_RE.sub(sub, value).replace("$${", "${")
    if isinstance(value, list):
        return [resolve_value(v, params, node, field, issues) for v in value]
    if isinstance(value, dict):
        return {k: resolve_value(v, params, node, field, issues) for k, v in value.items()}
    return value
