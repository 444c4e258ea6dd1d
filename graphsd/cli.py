"""The ``graphsd`` command: run | validate | convert | nodes | plugins | serve | batch.

Exit codes: 0 success, 1 a node failed, 2 a user mistake (bad workflow, bad option, unusable
output directory), 130 interrupted by Ctrl-C (SIGINT), 143 stopped by SIGTERM. User mistakes
are printed as messages, never as tracebacks.

Signals: during start-up (imports, loading plugins) Ctrl-C or SIGTERM ends the process at once
(nothing has been written yet). While a workflow runs, the first one asks the run to stop at
the next step or node (files are written atomically, so none is half-written); the second
aborts at once, after deleting the temporary files of writes in progress.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

from graphsd.errors import GraphsdError, Issue, WorkflowError
from graphsd.paths import remove_temporaries

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    from graphsd.workflow import SetText

    params: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise WorkflowError([Issue(f"--set expects key=value, got '{pair}'", code="usage")])
        key, value = pair.split("=", 1)
        params[key.strip()] = SetText(value)
    return params


def _engine(args: argparse.Namespace):
    from graphsd.context import Settings
    from graphsd.engine import Engine

    settings = Settings(
        device=getattr(args, "device", "auto"),
        output_dir=getattr(args, "output_dir", "output"),
        models_dir=getattr(args, "models_dir", "models"),
        input_dir=getattr(args, "input_dir", "input"),
        plugins_dirs=list(args.plugins_dir or []),
        allow_pickle=getattr(args, "allow_pickle", False),
        vram_budget_mb=getattr(args, "vram_budget", None),
        ram_budget_mb=getattr(args, "ram_budget", None),
        max_image_pixels=int(getattr(args, "max_image_megapixels", 0) * 1e6) or Settings.max_image_pixels,
        read_roots=_read_roots(args),
        compile=getattr(args, "compile", "off"),
        max_batch=getattr(args, "max_batch", Settings.max_batch),
    )
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        engine = Engine(settings)
    for w in engine.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return engine


def _read_roots(args: argparse.Namespace) -> list[str] | None:
    """A workflow taken from a PNG may come from anyone: unless --trust-workflow, the files it
    names must lie in the models folder, the input folder, the output folder or the PNG's own
    folder."""
    workflow = getattr(args, "workflow", None)
    if not workflow or not str(workflow).lower().endswith(".png") or getattr(args, "trust_workflow", False):
        return None
    return [
        args.models_dir,
        getattr(args, "input_dir", "input"),
        getattr(args, "output_dir", "output"),
        os.path.dirname(os.path.abspath(workflow)),
    ]


def _print_issues(err: WorkflowError, source: str) -> None:
    print(f"{source}: {len(err.issues)} problem{'s' if len(err.issues) != 1 else ''}:", file=sys.stderr)
    for issue in err.issues:
        print(f"  - {issue}", file=sys.stderr)


class _Display:
    """Per-node progress on stderr, one line per node; on a terminal also a tqdm bar for the
    steps of long nodes (in a pipe or a log file a bar would only be carriage returns)."""

    def __init__(self, total_nodes: int, enabled: bool, bars: bool):
        self.enabled = enabled
        self.bars = bars
        self.total = total_nodes
        self.done = 0
        self.bar: Any = None  # a tqdm bar while a long node runs

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        kind = event.kind
        if kind == "run_start":
            self.total = len(event.planned)
        elif kind in ("node_start", "node_cached"):
            self.done += 1
            state = "cached" if kind == "node_cached" else "run"
            print(f"[{self.done}/{self.total}] {event.node_id} ({event.node_type}) {state}", file=sys.stderr, flush=True)
        elif kind == "progress" and self.bars:
            from tqdm import tqdm

            if self.bar is None or self.bar.total != event.total:
                self._close()
                self.bar = tqdm(total=event.total, file=sys.stderr, leave=False, desc=event.node_id, dynamic_ncols=True)
            self.bar.n = event.value
            if event.info:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in event.info.items()}, refresh=False)
            self.bar.refresh()
        elif kind in ("node_done", "node_error", "run_done", "interrupted"):
            self._close()
            if kind == "node_error":
                print(f"  error in {event.node_id} ({event.node_type}): {event.message}", file=sys.stderr)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _quiet_libraries() -> None:
    """graphsd shows its own progress; the model libraries' loading bars would only add noise.
    They read this switch when imported (the huggingface_hub convention), so nothing is imported
    here: a workflow that loads no model never pays for importing them."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _exit_at_once(signum: int, frame: Any) -> None:
    """Start-up handler: nothing has been written yet, so stop without unwinding (a
    KeyboardInterrupt inside ``import torch`` can print a traceback or even abort)."""
    remove_temporaries()
    os.write(2, b"\ninterrupted\n")
    os._exit(128 + signum)


def _set_handlers(handler: Any) -> dict[int, Any]:
    """Install ``handler`` for SIGINT and SIGTERM (main thread only); the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in SIGNALS}


def _run_stoppable(engine: Any, run: Callable[[], Any]) -> tuple[Any, int | None]:
    """Run ``run()`` in a worker thread while the main thread waits for signals: the first
    SIGINT/SIGTERM interrupts the engine (it stops at the next step or node), the second aborts
    at once. Returns (the result, the signal that interrupted it or None)."""
    received: list[int] = []
    box: dict[str, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) > 1:
            _exit_at_once(signum, frame)
        engine.interrupt()
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        os.write(2, f"\n{name}: stopping after the current step (Ctrl-C again to abort at once)...\n".encode())

    def work() -> None:
        try:
            box["result"] = run()
        except BaseException as exc:  # re-raised in the main thread
            box["error"] = exc

    previous = _set_handlers(on_signal)
    try:
        worker = threading.Thread(target=work, name="graphsd-run", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in box:
        raise box["error"]
    return box["result"], (received[0] if received else None)


def cmd_run(args: argparse.Namespace) -> int:
    params = _parse_sets(args.set or [])
    _quiet_libraries()
    engine = _engine(args)
    graph = engine.load(args.workflow, params)
    display = _Display(0, enabled=not args.quiet, bars=sys.stderr.isatty())
    result, signum = _run_stoppable(engine, lambda: engine.run(graph, outputs=args.output or None, on_event=display))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for path in result.files:
            print(path)
        for failure in result.errors:
            print(f"error: {failure}", file=sys.stderr)
            if args.verbose and failure.traceback:
                print(failure.traceback, file=sys.stderr)
        if result.status == "interrupted":
            print("interrupted", file=sys.stderr)
    if result.status == "interrupted":
        return 128 + (signum or signal.SIGINT)
    return {"success": EXIT_OK, "failed": EXIT_FAILED}[result.status]


def cmd_validate(args: argparse.Namespace) -> int:
    params = _parse_sets(args.set or [])
    engine = _engine(args)
    graph = engine.load(args.workflow, params)
    print(f"{args.workflow}: ok ({len(graph.nodes)} nodes)")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    """Write the workflow a file holds (a ComfyUI API prompt, an editor file, a PNG carrying
    either, a request body wrapping one, or a graphsd workflow) as a graphsd workflow: YAML, or
    JSON when the target ends in ``.json``; ``-`` prints it. It is validated first, and an
    existing target is replaced only with ``--overwrite`` (atomically)."""
    from pathlib import Path

    import yaml

    from graphsd.paths import write_atomic

    engine = _engine(args)
    document = engine.read(args.workflow)
    engine.load(document)  # validated: a file that cannot run is not written
    as_json = args.target.lower().endswith(".json")
    if as_json:
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    else:
        body = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=120)
        text = f"# {Path(args.workflow).name}, converted by graphsd convert\n{body}"
    if args.target == "-":
        sys.stdout.write(text)
        return EXIT_OK
    target = Path(args.target)
    if target.is_dir() or (target.exists() and not args.overwrite):
        what = "is a folder" if target.is_dir() else "exists (pass --overwrite to replace it)"
        raise GraphsdError(f"{target} {what}; nothing was written")

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    try:
        written = write_atomic(target, write, overwrite=args.overwrite)
    except OSError as exc:
        raise GraphsdError(f"cannot write {target}: {exc.strerror or exc}") from None
    print(written)
    return EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    engine = _engine(args)
    names = sorted(engine.nodes)
    if args.builtin:
        builtin = {n for p in engine.registry.plugins if p.source == "builtin" for n in p.nodes}
        names = [n for n in names if n in builtin]
    schemas = [engine.nodes[name].schema() for name in names]
    if args.json:
        print(json.dumps(schemas, indent=2, default=str))
        return EXIT_OK
    if args.markdown:
        print(nodes_markdown(schemas), end="")
        return EXIT_OK
    for s in schemas:
        print(f"{s['type']}  [{s['category']}]  {s['description']}")
        for name, f in s["inputs"].items():
            kind = "link" if f["link_only"] else _constraints(f, quote="")
            print(f"    in  {name}: {f['type']} ({kind}) {f['description']}")
        for name, f in s["outputs"].items():
            print(f"    out {name}: {f['type']} {f['description']}")
    return EXIT_OK


def _constraints(f: dict, quote: str = "`") -> str:
    """'required; default ...; min … max; one of ...' for one input of a node schema."""
    parts = ["required"] if f["required"] else []
    if "default" in f:
        parts.append(f"default {quote}{f['default']!r}{quote}")
    if "min" in f or "max" in f:
        parts.append(f"{f.get('min', '−∞')} … {f.get('max', '∞')}")
    if "choices" in f:
        parts.append("one of " + ", ".join(f"{quote}{c}{quote}" for c in f["choices"]))
    return "; ".join(parts)


def nodes_markdown(schemas: list[dict]) -> str:
    """The node reference (docs/nodes.md) generated from the node schemas."""
    out = ["# Node reference", "", "Generated by `graphsd nodes --builtin --markdown`; do not edit by hand.", ""]
    by_cat: dict[str, list[dict]] = {}
    for s in schemas:
        by_cat.setdefault(s["category"], []).append(s)
    for cat in sorted(by_cat):
        out += [f"## {cat}", ""]
        for s in by_cat[cat]:
            flags = [w for w, on in (("output node", s["output_node"]), ("never cached", not s["cacheable"])) if on]
            out += [f"### {s['type']}" + (f" ({', '.join(flags)})" if flags else ""), "", s["description"], ""]
            out += ["| input | type | | description |", "| --- | --- | --- | --- |"]
            for name, f in s["inputs"].items():
                kind = "link" if f["link_only"] else _constraints(f)
                out.append(f"| `{name}` | {f['type']} | {kind} | {f['description']} |")
            out += ["", "| output | type | description |", "| --- | --- | --- |"]
            for name, f in s["outputs"].items():
                out.append(f"| `{name}` | {f['type']} | {f['description']} |")
            out.append("")
    return "\n".join(out)


def cmd_plugins(args: argparse.Namespace) -> int:
    engine = _engine(args)
    for info in engine.registry.plugins:
        status = f"FAILED: {info.error}" if info.error else f"{len(info.nodes)} nodes"
        print(f"{info.name}  ({info.source})  {status}")
        for n in info.nodes:
            print(f"    {n}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from graphsd.server.app import ServerConfig, serve
    except ImportError as exc:
        print(f'error: graphsd serve needs the server extra ({exc.name} is missing): pip install "graphsd[server]"', file=sys.stderr)
        return EXIT_USAGE
    _quiet_libraries()
    config = ServerConfig(
        host=args.host,
        port=args.port,
        output_dir=args.output_dir,
        input_dir=args.input_dir,
        data_dir=args.data_dir,
        models_dir=args.models_dir,
        token=args.token or os.environ.get("GRAPHSD_SERVER_TOKEN") or None,
        allow_pickle=args.allow_pickle,
        device=args.device,
        plugins_dirs=list(args.plugins_dir or []),
        vram_budget_mb=args.vram_budget,
        ram_budget_mb=args.ram_budget,
        max_upload_mb=args.max_upload_mb,
        max_history=args.max_history,
        open_browser=args.open,
        ray_address=args.ray,
        workers=args.workers,
    )
    return serve(config)


def cmd_batch(args: argparse.Namespace) -> int:
    from graphsd.batch import BatchOptions, run_batch, summary

    _quiet_libraries()
    engine = _engine(args)
    common = _parse_sets(args.set or [])
    options = BatchOptions(args.workflow, args.params, engine.settings, common, args.ray, args.workers, progress=not args.quiet)
    rows, code = run_batch(options, engine=engine)
    print(summary(rows), file=sys.stderr)
    return code


RAY_HELP = (
    "run on Ray workers: alone or 'auto', the cluster on this machine (ray start --head) or else a new local one; "
    'or a cluster\'s address (host:port). Needs pip install "graphsd[ray]"'
)
INPUT_DIR_HELP = "where a ComfyUI prompt's LoadImage names its images (default ./input, as ComfyUI's input folder)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphsd", description="Run Stable-Diffusion-style workflows as graphs of typed nodes.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--plugins-dir", action="append", metavar="DIR", help="extra plugins directory (repeatable; also GRAPHSD_PLUGINS_DIR)"
    )
    common.add_argument("--models-dir", default="models", metavar="DIR", help="where model names resolve (default ./models)")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="run a workflow (YAML, JSON, ComfyUI API prompt, or a PNG that carries one)")
    run.add_argument("workflow")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a param (repeatable)")
    run.add_argument("--output", action="append", metavar="NODE", help="run only this output node and what it needs (repeatable)")
    run.add_argument("--output-dir", default="output", metavar="DIR", help="where files are written (default ./output)")
    run.add_argument("--input-dir", default="input", metavar="DIR", help=INPUT_DIR_HELP)
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    run.add_argument("--vram-budget", type=float, metavar="MB", help="keep at most this much model weight on the GPU (model offload)")
    run.add_argument(
        "--compile",
        nargs="?",
        const="reduce-overhead",
        default="off",
        metavar="MODE",
        choices=("off", "reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs", "fp8"),  # = context.COMPILE_MODES
        help="compile the U-Net and VAE decoder with torch.compile (alone: reduce-overhead; also default, max-autotune, "
        "max-autotune-no-cudagraphs, fp8 = reduce-overhead with float8 linear layers through torchao, not fp16's numbers; "
        "default off). The first image of each shape pays the compile; later ones run faster",
    )
    run.add_argument(
        "--ram-budget", type=float, metavar="MB", help="keep at most this much model weight in RAM (least recently used models are dropped)"
    )
    run.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pickle-based model files (.ckpt/.pt/.pth/.bin) you trust; they are read with torch.load(weights_only=True), "
        "which loads tensors only. This is the only switch: a workflow cannot turn it on",
    )
    run.add_argument(
        "--trust-workflow",
        action="store_true",
        help="let a workflow taken from a PNG read files anywhere (by default it reads only the models, output and PNG folders)",
    )
    run.add_argument(
        "--max-image-megapixels", type=float, default=0, metavar="MP", help="largest image LoadImage reads (default 67, i.e. 8192x8192)"
    )
    run.add_argument(
        "--max-batch",
        type=int,
        default=16,
        metavar="N",
        help="run up to N independent nodes that share a model and settings (a grid of seeds or prompts) as one batch "
        "(default 16; 0 or 1: one by one)",
    )
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    run.add_argument("--verbose", "-v", action="store_true", help="show tracebacks of unexpected node errors")
    run.set_defaults(func=cmd_run)

    val = sub.add_parser("validate", parents=[common], help="check a workflow without running it")
    val.add_argument("workflow")
    val.add_argument("--set", action="append", metavar="KEY=VALUE")
    val.add_argument("--input-dir", default="input", metavar="DIR", help=INPUT_DIR_HELP)
    val.set_defaults(func=cmd_validate)

    conv = sub.add_parser(
        "convert",
        parents=[common],
        help="write a ComfyUI file (API prompt, editor file, PNG) or any workflow graphsd reads as a graphsd workflow",
        description="Write the workflow IN holds (a ComfyUI API prompt or editor file, a PNG carrying one, a request body "
        "wrapping one, a graphsd workflow) as a graphsd workflow OUT: YAML, or JSON when OUT ends in .json; '-' prints it. "
        "The result runs unconfined: a workflow taken from someone's PNG may read any file you can, so look at it first.",
    )
    conv.add_argument("workflow", metavar="IN")
    conv.add_argument("target", metavar="OUT")
    conv.add_argument("--input-dir", default="input", metavar="DIR", help=INPUT_DIR_HELP)
    conv.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    conv.set_defaults(func=cmd_convert)

    nodes = sub.add_parser("nodes", parents=[common], help="list node types with their inputs and outputs")
    nodes.add_argument("--json", action="store_true", help="machine-readable schemas")
    nodes.add_argument("--markdown", action="store_true", help="the node reference as Markdown (docs/nodes.md)")
    nodes.add_argument("--builtin", action="store_true", help="only graphsd's own nodes, not those of plugins")
    nodes.set_defaults(func=cmd_nodes)

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="serve ComfyUI's HTTP/websocket API and web frontend on one long-lived engine, with a persistent queue",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs --token)")
    serve.add_argument("--port", type=int, default=8188, help="port (default 8188; 0 picks a free one)")
    serve.add_argument("--output-dir", default="output", metavar="DIR", help="where images are written and /view reads (default ./output)")
    serve.add_argument("--input-dir", default="input", metavar="DIR", help="uploaded images, read by LoadImage (default ./input)")
    serve.add_argument(
        "--data-dir",
        default="graphsd-data",
        metavar="DIR",
        help="queue and history database, user settings and workflows (default ./graphsd-data)",
    )
    serve.add_argument(
        "--token", metavar="SECRET", help="require this token on every request (default: the GRAPHSD_SERVER_TOKEN environment variable)"
    )
    serve.add_argument("--allow-pickle", action="store_true", help="allow pickle-based model files you trust (see graphsd run --help)")
    serve.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    serve.add_argument("--vram-budget", type=float, metavar="MB", help="keep at most this much model weight on the GPU")
    serve.add_argument("--ram-budget", type=float, metavar="MB", help="keep at most this much model weight in RAM")
    serve.add_argument("--max-upload-mb", type=float, default=100.0, metavar="MB", help="largest upload (default 100)")
    serve.add_argument("--max-history", type=int, default=10000, metavar="N", help="finished prompts kept in the history (default 10000)")
    serve.add_argument("--open", action="store_true", help="open the web frontend in a browser")
    serve.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help=RAY_HELP)
    serve.add_argument("--workers", type=int, metavar="N", help="Ray workers (default: one per GPU, else one per CPU)")
    serve.set_defaults(func=cmd_serve)

    batch = sub.add_parser(
        "batch",
        parents=[common],
        help="run one workflow once per row of a params file (.jsonl or .csv), each row into its own output folder; resumable",
    )
    batch.add_argument("workflow")
    batch.add_argument("--params", required=True, metavar="ROWS", help="rows of params: .jsonl (one object a line) or .csv (a header)")
    batch.add_argument("--set", action="append", metavar="KEY=VALUE", help="a param for every row (repeatable); a row's own value wins")
    batch.add_argument("--output-dir", default="output", metavar="DIR", help="the rows' folders and batch-manifest.json (default ./output)")
    batch.add_argument("--input-dir", default="input", metavar="DIR", help=INPUT_DIR_HELP)
    batch.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    batch.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help=RAY_HELP)
    batch.add_argument("--workers", type=int, metavar="N", help="Ray workers (default: one per GPU, else one per CPU)")
    batch.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    batch.set_defaults(func=cmd_batch)

    plugins = sub.add_parser("plugins", parents=[common], help="list plugins and the nodes they provide")
    plugins.set_defaults(func=cmd_plugins)
    return p


def main(argv: list[str] | None = None) -> int:
    previous = _set_handlers(_exit_at_once)
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except WorkflowError as err:
        _print_issues(err, getattr(args, "workflow", "graphsd"))
        return EXIT_USAGE
    except GraphsdError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
