"""``graphsd batch WORKFLOW --params rows.jsonl|rows.csv``: one workflow, one job per row of params
(a prompt x seed grid, a dataset), run in this process one after the other, or fanned out over
Ray workers (``--ray``).

Each row writes into its own folder of the output directory, named by the row's ``name``
column when it has one, else ``row-00001``, ... (its place in the file). The folder appears
once, complete (see :class:`~graphsd.server.runner.RunJob`'s ``output_subdir``), so a second run
skips every row whose folder exists: a batch stopped by Ctrl-C, a crash or a dead worker is
resumed by running the same command again. ``batch-manifest.json`` in the output directory
records each row's state, files and error (written atomically, every few seconds and at the
end).

Rows are checked before anything runs: a row naming an unknown param, or a value the param
cannot take, fails at once with the reason and is not sent to a worker.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphsd.errors import GraphsdError, WorkflowError
from graphsd.server.runner import STAGING, RunJob, RunOutcome

MANIFEST = "batch-manifest.json"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
MANIFEST_INTERVAL_S = 2.0


@dataclass
class Row:
    index: int  # 1-based place in the params file
    name: str  # the row's folder
    params: dict[str, Any]
    status: str = "pending"  # pending | done | skipped | failed
    job: RunJob | None = None
    identity: str = ""
    files: list[str] = field(default_factory=list)
    error: str = ""
    duration_s: float = 0.0
    worker: int | None = None  # the Ray worker that ran it last


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` (one JSON object a line; blank lines skipped) or ``.csv`` (a
    header row naming the params) file. CSV values are text, converted to each param's type
    as ``--set`` values are; JSON strings too, other JSON values are taken as they are."""
    from graphsd.workflow import SetText

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise GraphsdError(f"cannot read the params file {p}: {exc.strerror or exc}") from None
    rows: list[dict[str, Any]] = []
    if p.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise GraphsdError(f"{p}: a CSV params file needs a header row naming the params")
        for number, record in enumerate(reader, start=2):
            if None in record:
                raise GraphsdError(f"{p}, line {number}: more values than the header has columns")
            rows.append({k.strip(): SetText(v if v is not None else "") for k, v in record.items()})
    elif p.suffix.lower() in (".jsonl", ".ndjson"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise GraphsdError(f"{p}, line {number}: not JSON ({exc})") from None
            if not isinstance(record, dict):
                raise GraphsdError(f"{p}, line {number}: a row must be a JSON object of params, got {type(record).__name__}")
            rows.append({str(k): SetText(v) if isinstance(v, str) else v for k, v in record.items()})
    else:
        raise GraphsdError(f"{p}: the params file must be .jsonl or .csv")
    return rows


def plan_rows(
    engine: Any,
    document: dict[str, Any],
    records: list[dict[str, Any]],
    common: dict[str, Any] | None = None,
    output_dir: str | None = None,
) -> list[Row]:
    """One Row per record: its folder name, and the job (the workflow with ``common`` and the
    row's params filled in, the row's winning) or, for a row that does not validate, the reason
    it fails."""
    from graphsd.distributed.routing import loader_types, model_identity
    from graphsd.workflow import merge_params, parse_document

    doc = parse_document(document)
    loaders = loader_types(engine.nodes)
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for index, record in enumerate(records, start=1):
        params = {**(common or {}), **record}
        name = str(params.get("name", "")).strip() or f"row-{index:05d}"
        if "name" in params and "name" not in doc.params:
            params.pop("name")
        if not NAME_RE.match(name):
            raise GraphsdError(
                f"row {index}: the name {name!r} cannot be a folder name (use letters, digits, '.', '_' and '-', from a letter or digit)"
            )
        if name in seen:
            raise GraphsdError(f"rows {seen[name]} and {index} have the same name {name!r}: each row needs its own output folder")
        seen[name] = index
        row = Row(index, name, params)
        try:
            merged = merge_params(doc, params)
            workflow = {**document, "params": merged}
            engine.load(workflow)
        except WorkflowError as err:
            row.status, row.error = "failed", "; ".join(str(i) for i in err.issues)
        except GraphsdError as err:
            row.status, row.error = "failed", str(err)
        else:
            row.job = RunJob(prompt_id=f"{name}-{uuid.uuid4().hex[:8]}", workflow=workflow, output_subdir=name, output_dir=output_dir)
            row.identity = model_identity(workflow, loaders)
        rows.append(row)
    return rows


class Manifest:
    """``batch-manifest.json``: the batch's rows and their states, written atomically."""

    def __init__(self, path: Path, workflow: str, params_file: str, rows: list[Row]):
        self.path = path
        self.workflow = workflow
        self.params_file = params_file
        self.rows = rows
        self.lock = threading.Lock()
        self.written = 0.0

    def write(self, force: bool = False) -> None:
        from graphsd.paths import write_atomic

        with self.lock:
            now = time.monotonic()
            if not force and now - self.written < MANIFEST_INTERVAL_S:
                return
            self.written = now
            data = {
                "workflow": self.workflow,
                "params": self.params_file,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "rows": [
                    {
                        "row": r.index,
                        "name": r.name,
                        "status": r.status,
                        "files": [os.path.relpath(f, self.path.parent) for f in r.files],
                        "error": r.error or None,
                        "duration_s": round(r.duration_s, 3),
                    }
                    for r in self.rows
                ],
            }
            text = json.dumps(data, indent=1)

        def write(tmp: Path) -> None:
            tmp.write_text(text, encoding="utf-8")

        write_atomic(self.path, write, overwrite=True)


def _finish(row: Row, outcome: RunOutcome | None, error: str | None, duration: float) -> None:
    """Record a row's end (once: a row that already ended keeps its first record)."""
    if row.status != "pending":
        return
    row.duration_s = duration
    if outcome is not None and outcome.status == "success":
        row.status = "done"
        row.files = sorted(f for files in outcome.files.values() for f in files)
    elif outcome is not None and outcome.status == "interrupted":
        return  # stays pending: the next run does it
    else:
        row.status = "failed"
        if error is None and outcome is not None:
            error = "; ".join(f"{e.get('node') or 'workflow'}: {e.get('message')}" for e in outcome.errors) or "the run failed"
        row.error = error or "the run failed"


RowEvents = Callable[[Row, dict[str, Any]], None]


def run_local(
    engine: Any, rows: list[Row], on_done: Callable[[Row], None], stop: threading.Event, on_event: RowEvents | None = None
) -> None:
    """Run the rows one after the other on ``engine`` (this process); ``on_event(row, event)``
    sees each job's events."""
    from graphsd.server.runner import LocalRunner

    runner = LocalRunner(engine)
    for row in rows:
        if stop.is_set():
            return
        assert row.job is not None
        t0 = time.perf_counter()
        try:
            outcome, error = runner.run(row.job, _events(row, on_event)), None
        except GraphsdError as exc:
            outcome, error = None, str(exc)
        _finish(row, outcome, error, time.perf_counter() - t0)
        on_done(row)


def _events(row: Row, on_event: RowEvents | None) -> Callable[[dict[str, Any]], None]:
    def emit(event: dict[str, Any]) -> None:
        if on_event is not None:
            on_event(row, event)

    return emit


def run_pool(pool: Any, rows: list[Row], on_done: Callable[[Row], None], stop: threading.Event, on_event: RowEvents | None = None) -> None:
    """Run the rows on a :class:`~graphsd.distributed.ray_pool.RayPool`: one thread per worker
    takes the next row for it (:meth:`~graphsd.distributed.routing.Router.pick`: a row whose
    model it holds first)."""
    backlog = list(rows)
    lock = threading.Lock()

    def serve(slot: Any) -> None:
        while not stop.is_set():
            with lock:
                row = pool.router.pick(slot, [(r, r.identity) for r in backlog])
                if row is None:
                    return
                backlog.remove(row)
                pool.router.reserve(slot, row.identity)
            row.worker = slot.index
            t0 = time.perf_counter()
            try:
                outcome, error = pool.execute(slot, row.job, _events(row, on_event), row.identity), None
            except GraphsdError as exc:
                outcome, error = None, str(exc)
            _finish(row, outcome, error, time.perf_counter() - t0)
            on_done(row)

    threads = [threading.Thread(target=serve, args=(slot,), name=f"graphsd-batch-{slot.index}", daemon=True) for slot in pool.router.slots]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)


def sweep_staging(output_dir: Path) -> None:
    """Remove what runs that were killed left in the staging folder (one batch per output
    folder at a time)."""
    shutil.rmtree(output_dir / STAGING, ignore_errors=True)


@dataclass
class BatchOptions:
    workflow: str
    params_file: str
    settings: Any  # graphsd.context.Settings
    common: dict[str, Any] = field(default_factory=dict)  # params for every row (--set), under the rows' own
    ray_address: str | None = None  # None: run here; "" or "auto" or an address: on Ray
    workers: int | None = None
    progress: bool = True


def run_batch(options: BatchOptions, engine: Any = None, pool: Any = None, on_event: RowEvents | None = None) -> tuple[list[Row], int]:
    """Run a batch (see the module docstring); returns the rows and the exit code: 0 every row
    done or skipped, 1 some row failed, 130/143 stopped by a signal (the rest runs next time).
    ``engine`` / ``pool``: reuse these (tests, benchmarks) instead of making them;
    ``on_event(row, event)`` sees the jobs' events."""
    from tqdm import tqdm

    from graphsd.engine import Engine

    engine = engine or Engine(options.settings)
    output_dir = Path(options.settings.output_dir).resolve()
    records = read_rows(options.params_file)
    rows = plan_rows(engine, engine.read(options.workflow), records, options.common, str(output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    sweep_staging(output_dir)
    for row in rows:
        folder = output_dir / row.name
        if row.status == "pending" and folder.is_dir():
            row.status = "skipped"
            row.files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    todo = [r for r in rows if r.status == "pending"]
    manifest = Manifest(output_dir / MANIFEST, str(options.workflow), str(options.params_file), rows)
    manifest.write(force=True)
    done_before = len(rows) - len(todo)
    bar = tqdm(total=len(rows), initial=done_before, file=sys.stderr, disable=not options.progress, unit="row", dynamic_ncols=True)
    bar_lock = threading.Lock()

    def on_done(row: Row) -> None:
        with bar_lock:
            bar.update(1)
        manifest.write()

    stop = threading.Event()
    received: list[int] = []
    if todo and pool is None and options.ray_address is not None:
        from graphsd.distributed.ray_pool import RayPool, connect

        connect(options.ray_address or None, num_cpus=options.workers)
        pool = RayPool(options.settings, options.workers)
    if pool is not None:
        work = functools.partial(run_pool, pool, todo, on_done, stop, on_event)
    else:
        work = functools.partial(run_local, engine, todo, on_done, stop, on_event)

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) > 1:
            os._exit(128 + signum)
        stop.set()
        if pool is not None:
            pool.interrupt(None)
        else:
            engine.interrupt()
        os.write(2, b"\nstopping: rows in progress stop now; run the same command again to do the rest (Ctrl-C again to abort)\n")

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        runner = threading.Thread(target=work, name="graphsd-batch", daemon=True)
        runner.start()
        while runner.is_alive():
            runner.join(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        bar.close()
        manifest.write(force=True)
        sweep_staging(output_dir)  # what attempts on workers that died left
    if received:
        return rows, 128 + received[0]
    return rows, 1 if any(r.status == "failed" for r in rows) else 0


def summary(rows: list[Row]) -> str:
    """The end-of-batch lines: counts, then each failed row with its reason."""
    count = {s: sum(r.status == s for r in rows) for s in ("done", "skipped", "failed", "pending")}
    line = f"batch: {len(rows)} rows: {count['done']} done, {count['skipped']} skipped (done before), {count['failed']} failed"
    if count["pending"]:
        line += f", {count['pending']} not run (stopped; run again to finish)"
    lines = [line]
    lines += [f"  failed {r.name} (row {r.index}): {r.error}" for r in rows if r.status == "failed"]
    return "\n".join(lines)
