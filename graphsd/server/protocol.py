"""ComfyUI's wire formats, from graphsd's objects: a run's events as websocket messages
(:class:`RunMessages`), validation problems as ``node_errors``, output files as image
references for ``/view``, stored prompts as ``/jobs``, ``/history`` and ``/queue`` items.

Node ids on the wire are the prompt's own (strings, ``"12:5"`` inside subgraphs): a graphsd node
made from a prompt node reports as that node (KSampler's two graphsd nodes both report as the
KSampler), through the ``origins`` map the prompt's translation returned.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from graphsd.errors import Issue, WorkflowError
from graphsd.server.runner import RunOutcome
from graphsd.server.store import Job

IMAGE_SUFFIXES = {".png": "images", ".jpg": "images", ".jpeg": "images", ".webp": "images", ".gif": "images"}

#: graphsd issue code -> ComfyUI error type
ERROR_TYPES = {
    "missing_input": "required_input_missing",
    "out_of_range": "value_not_valid",
    "bad_value": "value_not_valid",
    "unsupported": "value_not_in_list",
    "unknown_type": "invalid_prompt",
    "missing_node": "bad_linked_input",
    "missing_output": "bad_linked_input",
    "type_mismatch": "return_type_mismatch",
    "literal_for_link": "bad_linked_input",
    "unknown_input": "value_not_valid",
    "cycle": "dependency_cycle",
    "no_outputs": "prompt_no_outputs",
    "bad_path": "value_not_valid",
}


#: ``extra_data.preview_method`` values (the frontend's "Live preview method" setting; it sends
#: nothing for "default"). graphsd has one preview method, so auto, latent2rgb and taesd all ask
#: for it (see graphsd.std.sampling.preview).
PREVIEW_METHODS = ("default", "none", "auto", "latent2rgb", "taesd")
#: binary websocket frame type of a preview with its node (PREVIEW_IMAGE_WITH_METADATA)
PREVIEW_IMAGE_WITH_METADATA = 4


def preview_method_problem(extra_data: dict[str, Any]) -> str | None:
    """Why ``extra_data.preview_method`` is not acceptable, or None."""
    method = extra_data.get("preview_method")
    if method is None or (isinstance(method, str) and method in PREVIEW_METHODS):
        return None
    return f"extra_data.preview_method is {method!r}; use one of {', '.join(PREVIEW_METHODS)} (or leave it out)"


def wants_previews(extra_data: dict[str, Any], client_flags: dict[str, Any]) -> bool:
    """Whether a prompt's run sends previews: ``preview_method`` none turns them off, auto /
    latent2rgb / taesd on; left out (or default), they go to a client whose websocket announced
    ``supports_preview_metadata`` (the frontend does), since only such a client reads them."""
    method = extra_data.get("preview_method") or "default"
    if method == "default":
        return client_flags.get("supports_preview_metadata") is True
    return method != "none"


def preview_frame(prompt_id: str, node_id: str, image_type: str, image: bytes) -> bytes:
    """A binary websocket frame of type 4: ``u32 4 | u32 len | metadata JSON | image`` (big-endian)."""
    meta = json.dumps(
        {
            "node_id": node_id,
            "prompt_id": prompt_id,
            "display_node_id": node_id,
            "parent_node_id": node_id.rsplit(":", 1)[0] if ":" in node_id else None,
            "real_node_id": node_id,
            "image_type": image_type,
        }
    ).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + image


def now_ms() -> int:
    return int(time.time() * 1000)


def number_json(number: float) -> int | float:
    return int(number) if float(number).is_integer() else number


def file_ref(path: str | Path, roots: dict[str, Path]) -> dict[str, str] | None:
    """``{"filename", "subfolder", "type"}`` for a file under one of ``roots`` (type → folder),
    as ``/view`` takes it; None for a file elsewhere."""
    resolved = Path(path).resolve()
    for kind, root in roots.items():
        root = root.resolve()
        if root in resolved.parents:
            rel = resolved.relative_to(root)
            return {"filename": rel.name, "subfolder": rel.parent.as_posix() if rel.parent != Path(".") else "", "type": kind}
    return None


def ui_output(files: list[str], roots: dict[str, Path]) -> dict[str, list[dict[str, str]]]:
    """A node's files as the ``output`` of an ``executed`` message: ``{"images": [refs]}``."""
    out: dict[str, list[dict[str, str]]] = {}
    for f in files:
        kind = IMAGE_SUFFIXES.get(Path(f).suffix.lower())
        ref = file_ref(f, roots)
        if kind and ref:
            out.setdefault(kind, []).append(ref)
    return out


class RunMessages:
    """Turns one prompt's graphsd events (``Event.to_dict()`` mappings, in order) into ComfyUI
    websocket messages ``(type, data)``: execution_start, execution_cached, executing,
    progress_state, progress, executed, and at the end execution_success / execution_error /
    execution_interrupted followed by ``executing`` with node null."""

    def __init__(self, prompt_id: str, origins: dict[str, Any], roots: dict[str, Path]):
        self.prompt_id = prompt_id
        self.origins = origins
        self.roots = roots
        self.parts: dict[str, set[str]] = {}  # prompt node id -> its planned graphsd nodes
        self.cached: set[str] = set()  # graphsd ids whose outputs came from the cache
        self.visited: set[str] = set()  # graphsd ids that started, came from the cache or were skipped after a failure
        self.reported_cached: set[str] = set()  # prompt ids
        self.executed: list[str] = []  # prompt ids, in order
        self.states: dict[str, dict[str, Any]] = {}
        self.current: str | None = None
        self.outputs: dict[str, dict[str, Any]] = {}
        self.history: list[list[Any]] = []  # the status messages ComfyUI keeps in the history

    def cid(self, node_id: str) -> str:
        origin = self.origins.get(node_id)
        return str(origin["id"]) if origin else node_id

    def class_type(self, node_id: str, fallback: str = "") -> str:
        origin = self.origins.get(node_id)
        return str(origin["class_type"]) if origin else fallback

    def _node(self, cid: str) -> dict[str, Any]:
        return {"node": cid, "display_node": cid, "prompt_id": self.prompt_id}

    def _state(self, cid: str, state: str, value: float | None = None, maximum: float | None = None) -> tuple[str, dict[str, Any]]:
        entry = self.states.setdefault(
            cid,
            {
                "value": 0,
                "max": 1,
                "state": state,
                "node_id": cid,
                "prompt_id": self.prompt_id,
                "display_node_id": cid,
                "parent_node_id": cid.rsplit(":", 1)[0] if ":" in cid else None,
                "real_node_id": cid,
            },
        )
        entry["state"] = state
        if value is not None:
            entry["value"] = value
        if maximum is not None:
            entry["max"] = maximum
        if state == "finished":
            entry["value"] = entry["max"]
        return "progress_state", {"prompt_id": self.prompt_id, "nodes": {k: dict(v) for k, v in self.states.items()}}

    def _flush_cached(self) -> list[tuple[str, dict[str, Any]]]:
        done = sorted(
            (cid for cid, parts in self.parts.items() if parts and parts <= self.cached and cid not in self.reported_cached),
            key=list(self.parts).index,
        )
        if not done:
            return []
        self.reported_cached.update(done)
        data = {"nodes": done, "prompt_id": self.prompt_id, "timestamp": now_ms()}
        self.history.append(["execution_cached", data])
        return [("execution_cached", data)]

    def event(self, e: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        kind = e.get("kind")
        out: list[tuple[str, dict[str, Any]]] = []
        if kind == "run_start":
            for gid in e.get("planned", ()):
                self.parts.setdefault(self.cid(gid), set()).add(gid)
            data = {"prompt_id": self.prompt_id, "timestamp": now_ms()}
            self.history.append(["execution_start", data])
            out.append(("execution_start", data))
        elif kind == "node_cached":
            self.cached.add(e["node_id"])
            self.visited.add(e["node_id"])
        elif kind == "node_start":
            self.visited.add(e["node_id"])
            out += self._flush_cached()
            cid = self.cid(e["node_id"])
            if cid != self.current:
                self.current = cid
                out.append(("executing", self._node(cid)))
            out.append(self._state(cid, "running"))
        elif kind == "progress":
            cid = self.cid(e["node_id"])
            value, total = e.get("value", 0), e.get("total", 0)
            out.append(self._state(cid, "running", value, total))
            out.append(("progress", {"value": value, "max": total, "prompt_id": self.prompt_id, "node": cid}))
        elif kind == "node_done":
            cid = self.cid(e["node_id"])
            if cid not in self.executed:
                self.executed.append(cid)
            out.append(self._state(cid, "finished"))
            output = ui_output(list(e.get("files", ())), self.roots)
            if output:
                self.outputs[cid] = output
                out.append(("executed", {**self._node(cid), "output": output}))
        elif kind == "node_error":
            self.visited.update([e["node_id"], *e.get("skipped", ())])
            out.append(self._state(self.cid(e["node_id"]), "error"))
        elif kind == "run_done":
            if e.get("status") != "interrupted":
                # planned nodes never visited were not needed: what depends on them came from the cache
                self.cached |= {gid for parts in self.parts.values() for gid in parts} - self.visited
            out += self._flush_cached()
        return out

    def finish(self, outcome: RunOutcome) -> list[tuple[str, dict[str, Any]]]:
        """The closing messages, once the run has ended."""
        out: list[tuple[str, dict[str, Any]]] = []
        for gid, files in outcome.files.items():
            cid = self.cid(gid)
            output = ui_output(files, self.roots)
            if output and cid not in self.outputs:  # a cached output node: show what it wrote
                self.outputs[cid] = output
                out.append(("executed", {**self._node(cid), "output": output}))
        stamp = {"prompt_id": self.prompt_id, "timestamp": now_ms()}
        if outcome.status == "success":
            data: dict[str, Any] = stamp
            kind = "execution_success"
        elif outcome.status == "interrupted":
            node = self.current or ""
            kind, data = "execution_interrupted", {**stamp, "node_id": node, "node_type": self.class_type(node), "executed": self.executed}
        else:
            first = outcome.errors[0] if outcome.errors else {"node": "", "type": "", "message": "the run failed", "error_type": "Error"}
            kind, data = "execution_error", self.error_data(first, outcome.errors)
        self.history.append([kind, data])
        out.append((kind, data))
        out.append(("executing", {"node": None, "display_node": None, "prompt_id": self.prompt_id}))
        return out

    def error_data(self, first: dict[str, Any], errors: list[dict[str, Any]]) -> dict[str, Any]:
        node = str(first.get("node", ""))
        return {
            "prompt_id": self.prompt_id,
            "timestamp": now_ms(),
            "node_id": self.cid(node),
            "node_type": self.class_type(node, str(first.get("type", ""))),
            "executed": self.executed,
            "exception_message": str(first.get("message", "")),
            "exception_type": str(first.get("error_type", "")),
            "traceback": str(first.get("traceback") or "").splitlines(),
            "current_inputs": {},
            "current_outputs": {},
            # graphsd runs the branches that do not depend on a failed node: every failure
            "errors": [
                {
                    "node_id": self.cid(str(f.get("node", ""))),
                    "node_type": self.class_type(str(f.get("node", "")), str(f.get("type", ""))),
                    "exception_message": str(f.get("message", "")),
                    "exception_type": str(f.get("error_type", "")),
                }
                for f in errors
            ],
        }

    def status(self, outcome_status: str) -> dict[str, Any]:
        """The history's ``status`` entry."""
        return {
            "status_str": "success" if outcome_status == "success" else "error",
            "completed": outcome_status == "success",
            "messages": self.history,
        }


# ---- validation errors ------------------------------------------------------------------------
def _links(node: Any) -> list[str]:
    inputs = node.get("inputs") if isinstance(node, dict) else None
    if not isinstance(inputs, dict):
        return []
    return [str(v[0]) for v in inputs.values() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int))]


def _dependents(prompt: dict[str, Any], outputs: list[str]) -> dict[str, set[str]]:
    """prompt node id -> the output nodes that (transitively) use it."""
    found: dict[str, set[str]] = {}
    for out in outputs:
        stack, seen = [out], set()
        while stack:
            node = stack.pop()
            if node in seen or node not in prompt:
                continue
            seen.add(node)
            found.setdefault(node, set()).add(out)
            stack.extend(_links(prompt[node]))
    return found


def error_response(issues: list[Issue], prompt: dict[str, Any], origins: dict[str, Any], output_nodes: list[str]) -> dict[str, Any]:
    """The body of a refused ``POST /prompt``: ``{"error": {...}, "node_errors": {id: {"errors":
    [...], "dependent_outputs": [...], "class_type": ...}}}``, each issue on the prompt node and
    input it is about."""
    dependents = _dependents(prompt, output_nodes)
    node_errors: dict[str, Any] = {}
    general: list[Issue] = []
    for issue in issues:
        cid, input_name = None, issue.field
        if issue.node is not None and issue.node in origins:
            origin = origins[issue.node]
            cid = str(origin["id"])
            input_name = origin.get("inputs", {}).get(issue.field, issue.field) if issue.field else None
        elif issue.node is not None and issue.node in prompt:
            cid = issue.node
        if cid is None:
            general.append(issue)
            continue
        node = prompt.get(cid)
        entry = node_errors.setdefault(
            cid,
            {
                "errors": [],
                "dependent_outputs": sorted(dependents.get(cid, set())),
                "class_type": node.get("class_type", "") if isinstance(node, dict) else "",
            },
        )
        details = f"{input_name}: {issue.hint}" if input_name and issue.hint else (issue.hint or (input_name or ""))
        entry["errors"].append(
            {
                "type": ERROR_TYPES.get(issue.code, issue.code),
                "message": issue.message,
                "details": details,
                "extra_info": {"input_name": input_name} if input_name else {},
            }
        )
    summary = "\n".join(str(i) for i in issues)
    if node_errors:
        error = {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": summary,
            "extra_info": {},
        }
    else:
        first = general[0] if general else Issue("invalid prompt")
        message = first.message + (f" ({first.hint})" if first.hint else "")
        error = {"type": ERROR_TYPES.get(first.code, "invalid_prompt"), "message": message, "details": summary, "extra_info": {}}
    return {"error": error, "node_errors": node_errors}


def workflow_error_response(err: WorkflowError, prompt: dict[str, Any], origins: dict[str, Any], output_nodes: list[str]) -> dict[str, Any]:
    return error_response(err.issues, prompt, origins, output_nodes)


# ---- stored prompts ---------------------------------------------------------------------------
JOB_STATUS = {"pending": "pending", "running": "in_progress", "completed": "completed", "failed": "failed", "cancelled": "cancelled"}


def queue_entry(job: Job) -> list[Any]:
    """A ``/queue`` and ``/history`` ``prompt`` entry: [number, id, prompt, extra_data, outputs]."""
    return [number_json(job.number), job.prompt_id, job.prompt, job.extra_data, job.output_nodes]


def history_entry(job: Job) -> dict[str, Any]:
    messages = job.messages
    success = job.status == "completed"
    return {
        "prompt": queue_entry(job),
        "outputs": job.outputs,
        "status": {"status_str": "success" if success else "error", "completed": success, "messages": messages},
        "meta": {cid: {"node_id": cid, "display_node": cid, "parent_node": None, "real_node_id": cid} for cid in job.outputs},
    }


def job_item(job: Job, detail: bool = False) -> dict[str, Any]:
    """A ``/jobs`` item (and with ``detail``, ``/jobs/{id}``)."""
    item: dict[str, Any] = {
        "id": job.prompt_id,
        "status": JOB_STATUS[job.status],
        "create_time": int(job.created * 1000),
        "priority": number_json(job.number),
    }
    if job.started:
        item["execution_start_time"] = int(job.started * 1000)
    if job.finished:
        item["execution_end_time"] = int(job.finished * 1000)
    refs = [(cid, kind, ref) for cid, out in job.outputs.items() for kind, items in out.items() for ref in items]
    item["outputs_count"] = len(refs)
    previews = [r for r in refs if r[1] == "images"]
    item["previewable_outputs_count"] = len(previews)
    if previews:
        cid, kind, ref = previews[-1]
        item["preview_output"] = {**ref, "nodeId": cid, "mediaType": kind}
    workflow = (
        (job.extra_data.get("extra_pnginfo") or {}).get("workflow") if isinstance(job.extra_data.get("extra_pnginfo"), dict) else None
    )
    if isinstance(workflow, dict) and isinstance(workflow.get("id"), str):
        item["workflow_id"] = workflow["id"]
    if job.error:
        item["execution_error"] = {
            k: job.error.get(k) for k in ("node_id", "node_type", "exception_message", "exception_type", "traceback") if k in job.error
        }
    if detail:
        item["outputs"] = job.outputs
        item["workflow"] = {"prompt": job.prompt, "extra_data": job.extra_data}
        if job.status in ("completed", "failed", "cancelled"):
            item["execution_status"] = {
                "status_str": "success" if job.status == "completed" else "error",
                "completed": job.status == "completed",
                "messages": job.messages,
            }
    return item
