"""Hostile inputs for the ``graphsd`` command, run one after another in one fresh process.

Each case makes its files in a folder of its own, runs ``graphsd`` (``cli.main``) there, and
the runner records the exit code, what was printed, the time taken, the process's peak RSS
after it, and every file that appeared, changed or vanished. ``tests/test_hostile.py`` runs
this module as a script (``python hostile_cases.py RESULTS.json``) under a data-size limit
(``ulimit -d``), so a case that tries to allocate gigabytes fails inside that limit instead of
exhausting the machine, and then checks each case's record.

A case is a function ``setup(folder) -> argv`` registered with :func:`case`, which states the
expected exit code and what the message must say. Inside ``folder``, ``out/`` is the output
directory; files the case puts there beforehand must survive untouched, and nothing may be
written anywhere else.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import resource
import signal
import struct
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
TXT2IMG = ROOT / "workflows" / "txt2img.yaml"
COMFY = ROOT / "workflows" / "comfy_txt2img.json"
CASE_TIMEOUT_S = 60


@dataclass
class Case:
    name: str
    category: str
    setup: Callable[[Path], list[str]]
    exit: int
    says: tuple[str, ...] = ()
    never_says: tuple[str, ...] = ("Traceback", "weights_only=False")
    writes: int | None = 0  # files that must appear under out/ (None: not checked)
    sweeps: int = 0  # stale temporaries of killed processes that must be deleted


CASES: list[Case] = []


def case(category: str, exit: int, says: tuple[str, ...] = (), writes: int | None = 0, never_says: tuple[str, ...] = (),
         sweeps: int = 0):
    def register(setup: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
        CASES.append(Case(setup.__name__, category, setup, exit, says, Case.never_says + never_says, writes, sweeps))
        return setup

    return register


# ---- helpers to make files ------------------------------------------------------------------
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, chunks: list[tuple[bytes, bytes]] = (), rows: bool = True) -> bytes:
    """A grey 8-bit PNG of ``width``×``height`` black pixels, compressed row by row (so a huge
    image costs little memory to make), with extra chunks before the pixels."""
    out = [b"\x89PNG\r\n\x1a\n", png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))]
    out += [png_chunk(kind, data) for kind, data in chunks]
    if rows:
        comp = zlib.compressobj(9)
        row = b"\0" * (width + 1)
        idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    else:
        idat = zlib.compress(b"\0" * (width + 1))
    out += [png_chunk(b"IDAT", idat), png_chunk(b"IEND", b"")]
    return b"".join(out)


def text_chunk(key: str, value: str) -> tuple[bytes, bytes]:
    return b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")


def workflow(path: Path, nodes: dict, params: dict | None = None) -> Path:
    path.write_text(json.dumps({"version": 1, "params": params or {}, "nodes": nodes}))
    return path


def tiny_chain(extra: dict | None = None, unet: str = "@model.unet", clip: str = "@model.clip", steps: int = 1,
               size: int = 64, batch: int = 1, prompt: str = "a red circle") -> dict:
    """graphsd-tiny text-to-image in a few cheap steps, with ``extra`` nodes patched in."""
    return {
        "model": {"type": "CheckpointLoader", "inputs": {"path": "graphsd-tiny"}},
        **(extra or {}),
        "pos": {"type": "TextEncode", "inputs": {"clip": clip, "text": prompt}},
        "neg": {"type": "TextEncode", "inputs": {"clip": clip, "text": ""}},
        "noise": {"type": "LatentNoise", "inputs": {"seed": 1, "width": size, "height": size, "batch_size": batch}},
        "denoise": {"type": "UNetDenoiseLoop", "inputs": {"unet": unet, "positive": "@pos.cond", "negative": "@neg.cond",
                                                           "noise": "@noise.noise", "steps": steps}},
        "image": {"type": "VAEDecode", "inputs": {"vae": "@model.vae", "latent": "@denoise.latent"}},
        "save": {"type": "SaveImage", "inputs": {"image": "@image.image", "prefix": "img"}},
    }


def run_args(wf: Path, *extra: str) -> list[str]:
    return ["run", str(wf), "--output-dir", "out", "--models-dir", "models", "-q", *extra]


def lora_file(d: Path, name: str, fill: float | None = None, truncate: bool = False) -> Path:
    """A kohya LoRA for one attention projection of graphsd-tiny's U-Net."""
    import torch
    from safetensors.torch import save_file

    base = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    down, up = torch.randn(2, 128), torch.randn(64, 2)
    if fill is not None:
        down.fill_(fill)
        up.fill_(fill)
    (d / "models" / "loras").mkdir(parents=True, exist_ok=True)
    path = d / "models" / "loras" / name
    save_file({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up}, str(path))
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


class Payload:
    """A pickle that would create a marker file if it were ever unpickled with code allowed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_bomb(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"state_dict": Payload(marker)}, path)
    return path


# ---- paths and data loss ------------------------------------------------------------------
def _prefix_case(prefix: str) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        nodes = tiny_chain()
        nodes["save"]["inputs"]["prefix"] = prefix
        return run_args(workflow(d / "w.json", nodes))

    return setup


for _name, _prefix, _says in (
    ("save_prefix_dot", ".", "names the output directory itself"),
    ("save_prefix_sub_dot", "sub/.", "names the output directory itself"),
    ("save_prefix_parent", "../escaped", "leaves the output directory"),
    ("save_prefix_absolute", "/tmp/graphsd-escape", "absolute path"),
    ("save_prefix_backslash", "..\\escaped", "leaves the output directory"),
):
    _setup = _prefix_case(_prefix)
    _setup.__name__ = _name
    case("paths", 1, (_says,))(_setup)


@case("paths", 1, ("symbolic link",))
def save_prefix_through_symlink(d):
    (d / "out").mkdir()
    (d / "elsewhere").mkdir()
    (d / "out" / "link").symlink_to(d / "elsewhere")
    nodes = tiny_chain()
    nodes["save"]["inputs"]["prefix"] = "link/img"
    return run_args(workflow(d / "w.json", nodes))


@case("paths", 2, ("is a file", "--output-dir"))
def output_dir_is_a_file(d):
    (d / "out").write_text("not a folder")
    return run_args(workflow(d / "w.json", tiny_chain()))


@case("paths", 2, ("is a file",))
def output_dir_below_a_file(d):
    (d / "blocker").write_text("x")
    return ["run", str(workflow(d / "w.json", tiny_chain())), "--output-dir", "blocker/out", "-q"]


@case("paths", 0, writes=1)
def existing_images_are_kept(d):
    (d / "out").mkdir()
    (d / "out" / "img_00001.png").write_bytes(b"an earlier image")
    (d / "out" / "img_00007.png").write_bytes(b"another")
    return run_args(workflow(d / "w.json", tiny_chain()))


@case("paths", 0, writes=1, sweeps=1)
def stale_temporaries_are_swept(d):
    from graphsd.paths import _HOST

    (d / "out").mkdir()
    # a temporary left by a killed process (pid 2**22 + 1 is above Linux's pid_max)
    (d / "out" / f".graphsd-{_HOST}-{2**22 + 1}-abc.png.tmp").write_bytes(b"half an image")
    return run_args(workflow(d / "w.json", tiny_chain()))


# ---- workflow files -----------------------------------------------------------------------
def _file_case(name: str, filename: str, content: bytes | str, says: tuple[str, ...]) -> None:
    def setup(d: Path) -> list[str]:
        path = d / filename
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
        return run_args(path)

    setup.__name__ = name
    case("files", 2, says)(setup)


_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
)
_file_case("yaml_billion_laughs", "w.yaml", _LAUGHS, ("expands to more than",))
_file_case("yaml_deeply_nested", "w.yaml", "a: " + "[" * 50_000, ("nested more than",))
_file_case("yaml_deeply_nested_block", "w.yaml", "a:\n" + "- " * 20_000 + "x\n", ("nested more than",))
_file_case("json_deeply_nested", "w.json", "[" * 200_000 + "]" * 200_000, ("nested more than",))
_file_case("yaml_malformed", "w.yaml", "version: 1\nnodes: {a: [\n", ("malformed YAML", "line"))
_file_case("json_malformed", "w.json", '{"version": 1, "nodes": {', ("malformed JSON", "line"))
_file_case("binary_garbage", "w.yaml", bytes(range(256)) * 64, ("cannot read as UTF-8",))
_file_case("empty_file", "w.yaml", "", ("must be a mapping",))
_file_case("workflow_is_a_list", "w.json", "[1, 2, 3]", ("must be a mapping",))
_file_case("no_output_node", "w.json", json.dumps({"version": 1, "nodes": {"m": {"type": "CheckpointLoader", "inputs": {"path": "graphsd-tiny"}}}}),
           ("no output node", "--output"))
_file_case("unknown_node_type", "w.json", json.dumps({"version": 1, "nodes": {"s": {"type": "SaveImag", "inputs": {}}}}), ("SaveImage",))
_file_case("workflow_turns_on_pickle", "w.json", json.dumps({"version": 1, "nodes": tiny_chain(
    {"hn": {"type": "HypernetworkLoader", "inputs": {"unet": "@model.unet", "hypernetwork": "night", "allow_pickle": True}}}, unet="@hn.unet")}),
           ("allow_pickle",))


def _comfy(mutate: Callable[[dict], None]) -> bytes:
    prompt = json.loads(COMFY.read_text())
    mutate(prompt)
    return json.dumps(prompt).encode()


def _set_ksampler(name: str, value) -> Callable[[dict], None]:
    def mutate(prompt: dict) -> None:
        for node in prompt.values():
            if node["class_type"] == "KSampler":
                node["inputs"][name] = value

    return mutate


_file_case("comfy_no_outputs", "p.json", _comfy(lambda p: [p.pop(k) for k in [k for k, n in p.items() if n["class_type"] == "SaveImage"]]),
           ("Prompt has no outputs",))
_file_case("comfy_denoise_too_big", "p.json", _comfy(_set_ksampler("denoise", 3.5)), ("bigger than max of 1.0",))
_file_case("comfy_denoise_tiny", "p.json", _comfy(_set_ksampler("denoise", 1e-320)), ("at most 10000",))
_file_case("comfy_denoise_nan", "p.json", _comfy(_set_ksampler("denoise", float("nan"))), ("not a number",))
_file_case("comfy_steps_negative", "p.json", _comfy(_set_ksampler("steps", -5)), ("smaller than min of 1",))
_file_case("png_text_bomb", "bomb.png", png_bytes(8, 8, [(b"zTXt", b"prompt\0\0" + zlib.compress(b"{" * (8 << 20), 9))]),
           ("not a readable PNG",))
_file_case("png_huge_dimensions", "huge.png", png_bytes(200_000, 200_000, [text_chunk("prompt", "{}")], rows=False),
           ("not a readable PNG",))
_file_case("png_nested_workflow", "nested.png", png_bytes(8, 8, [text_chunk("graphsd_workflow", "[" * 100_000)]), ("nested more than",))
_file_case("png_without_workflow", "plain.png", png_bytes(8, 8), ("carries no workflow",))
_file_case("png_truncated", "cut.png", png_bytes(8, 8, [text_chunk("prompt", "{}")])[:30], ("not a readable PNG",))


def _png_reading(d: Path, *extra: str) -> list[str]:
    """A downloaded PNG whose workflow copies a file from elsewhere on the machine."""
    (d / "private").mkdir()
    (d / "private" / "secret.png").write_bytes(png_bytes(8, 8))
    (d / "downloads").mkdir()
    nodes = {"load": {"type": "LoadImage", "inputs": {"path": str(d / "private" / "secret.png")}},
             "save": {"type": "SaveImage", "inputs": {"image": "@load.image", "prefix": "copy"}}}
    doc = json.dumps({"version": 1, "params": {}, "nodes": nodes})
    (d / "downloads" / "nice.png").write_bytes(png_bytes(8, 8, [text_chunk("graphsd_workflow", doc)]))
    return run_args(d / "downloads" / "nice.png", *extra)


@case("paths", 1, ("secret.png", "outside the folders", "--trust-workflow"))
def png_workflow_reads_outside_its_folders(d):
    return _png_reading(d)


@case("paths", 0, writes=1)
def png_workflow_trusted_by_the_user(d):
    return _png_reading(d, "--trust-workflow")


@case("paths", 1, ("outside the folders",))
def png_workflow_loads_a_model_from_elsewhere(d):
    import shutil

    from graphsd.std.models.loading import builtin_models_dir

    shutil.copytree(builtin_models_dir() / "graphsd-tiny", d / "elsewhere")
    nodes = tiny_chain()
    nodes["model"]["inputs"]["path"] = str(d / "elsewhere")
    (d / "downloads").mkdir()
    doc = json.dumps({"version": 1, "params": {}, "nodes": nodes})
    (d / "downloads" / "nice.png").write_bytes(png_bytes(8, 8, [text_chunk("graphsd_workflow", doc)]))
    return run_args(d / "downloads" / "nice.png")


@case("files", 2, ("param 'seed' is a number",))
def set_value_of_wrong_type(d):
    return ["run", str(TXT2IMG), "--output-dir", "out", "-q", "--set", "seed=abc"]


@case("files", 2, ("no param named 'sed'",))
def set_unknown_param(d):
    return ["run", str(TXT2IMG), "--output-dir", "out", "-q", "--set", "sed=1"]


# ---- model files --------------------------------------------------------------------------
def _hypernetwork(d: Path, data) -> Path:
    import torch

    (d / "models" / "hypernetworks").mkdir(parents=True)
    path = d / "models" / "hypernetworks" / "h.pt"
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        torch.save(data, path)
    return path


def _with_hypernetwork(d: Path, *extra: str) -> list[str]:
    nodes = tiny_chain({"hn": {"type": "HypernetworkLoader", "inputs": {"unet": "@model.unet", "hypernetwork": "h"}}}, unet="@hn.unet")
    return run_args(workflow(d / "w.json", nodes), *extra)


@case("files", 1, ("h.pt", "layer_structure"))
def hypernetwork_layer_bomb(d):
    import torch

    _hypernetwork(d, {64: [{"linear.0.weight": torch.zeros(128, 64), "linear.0.bias": torch.zeros(128),
                            "linear.1.weight": torch.zeros(64, 128), "linear.1.bias": torch.zeros(64)}] * 2,
                      "layer_structure": [1, 100_000, 1]})
    return _with_hypernetwork(d, "--allow-pickle")


@case("files", 1, ("h.pt", "empty"))
def hypernetwork_empty_file(d):
    _hypernetwork(d, b"")
    return _with_hypernetwork(d, "--allow-pickle")


@case("files", 1, ("--allow-pickle",))
def hypernetwork_pickle_not_allowed(d):
    _hypernetwork(d, {64: [{}, {}]})
    return _with_hypernetwork(d)


@case("files", 1, ("h.pt", "Python objects"))
def hypernetwork_code_payload(d):
    (d / "models" / "hypernetworks").mkdir(parents=True)
    pickle_bomb(d / "models" / "hypernetworks" / "h.pt", d / "PWNED")
    return _with_hypernetwork(d, "--allow-pickle")


def _with_lora(d: Path, name: str, *extra: str) -> list[str]:
    nodes = tiny_chain({"lora": {"type": "LoraLoader", "inputs": {"unet": "@model.unet", "clip": "@model.clip", "lora": name}}},
                       unet="@lora.unet", clip="@lora.clip")
    return run_args(workflow(d / "w.json", nodes), *extra)


@case("files", 1, ("cut.safetensors", "truncated"))
def lora_truncated(d):
    lora_file(d, "cut.safetensors", truncate=True)
    return _with_lora(d, "cut")


@case("files", 1, ("nan.safetensors", "NaN"))
def lora_nan_weights(d):
    lora_file(d, "nan.safetensors", fill=float("nan"))
    return _with_lora(d, "nan")


@case("files", 1, ("NaN or infinite", "patch"))
def lora_overflowing_weights(d):
    lora_file(d, "huge.safetensors", fill=1e25)  # finite in the file; up @ down overflows fp32
    return _with_lora(d, "huge")


@case("files", 1, ("old.pt", "pickled object"))
def lora_pickle_with_code(d):
    (d / "models" / "loras").mkdir(parents=True)
    pickle_bomb(d / "models" / "loras" / "old.pt", d / "PWNED")
    return _with_lora(d, "old.pt", "--allow-pickle")


@case("files", 1, ("evil", "posix"))
def model_index_names_os_module(d):
    import shutil

    from graphsd.std.models.loading import builtin_models_dir

    shutil.copytree(builtin_models_dir() / "graphsd-tiny", d / "models" / "evil")
    index = json.loads((d / "models" / "evil" / "model_index.json").read_text())
    index["unet"] = ["posix", "system"]
    (d / "models" / "evil" / "model_index.json").write_text(json.dumps(index))
    nodes = tiny_chain()
    nodes["model"]["inputs"]["path"] = "evil"
    return run_args(workflow(d / "w.json", nodes))


@case("files", 1, ("evil.ckpt",))
def checkpoint_pickle_with_code(d):
    (d / "models").mkdir()
    pickle_bomb(d / "models" / "evil.ckpt", d / "PWNED")
    nodes = tiny_chain()
    nodes["model"]["inputs"]["path"] = "evil.ckpt"
    return run_args(workflow(d / "w.json", nodes), "--allow-pickle")


def _load_image_case(name: str, make: Callable[[Path], None], says: tuple[str, ...], exit: int = 1) -> None:
    def setup(d: Path) -> list[str]:
        make(d / "in.png")
        nodes = {"load": {"type": "LoadImage", "inputs": {"path": str(d / "in.png")}},
                 "save": {"type": "SaveImage", "inputs": {"image": "@load.image", "prefix": "copy"}}}
        return run_args(workflow(d / "w.json", nodes))

    setup.__name__ = name
    case("resources", exit, says)(setup)


_load_image_case("load_image_pixel_bomb", lambda p: p.write_bytes(png_bytes(10_000, 10_000)), ("10000x10000", "megapixels"))
_load_image_case("load_image_dimension_bomb", lambda p: p.write_bytes(png_bytes(200_000, 200_000, rows=False)), ("megapixels",))
_load_image_case("load_image_truncated", lambda p: p.write_bytes(png_bytes(64, 64)[:60]), ("not a readable image",))
_load_image_case("load_image_not_an_image", lambda p: p.write_text("hello"), ("not a readable image",))
_load_image_case("load_image_missing", lambda p: None, ("does not exist",), exit=2)  # refused at validation


# ---- resources ----------------------------------------------------------------------------
@case("resources", 1, ("needs at least", "GiB", "batch_size"))
def documented_maximum_size_and_batch(d):
    return run_args(workflow(d / "w.json", tiny_chain(size=16384, batch=64)))


@case("resources", 1, ("needs at least", "GiB"))
def documented_maximum_size(d):
    return run_args(workflow(d / "w.json", tiny_chain(size=16384)))


@case("resources", 0, writes=1)
def prompt_weighting_nesting_bomb(d):
    """160 kB of brackets nested 40,000 deep (each ':1)' keeps the weight finite)."""
    return run_args(workflow(d / "w.json", tiny_chain(prompt="(" * 40_000 + "a" + ":1)" * 40_000)))


@case("resources", 1, ("NaN or infinite", "weights"))
def prompt_weight_overflow(d):
    """Weights multiply: 1.1 ** 10000 is infinite in any float type."""
    return run_args(workflow(d / "w.json", tiny_chain(prompt="(" * 10_000 + "a" + ")" * 10_000)))


@case("resources", 0, writes=None)
def long_prompt_with_comment_sign(d):
    return ["run", str(TXT2IMG), "--output-dir", "out", "-q", "--set", "steps=1", "--set", "prompt=photo, 8k #best", "--set", "negative="]


# ---- the runner -----------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, str]:
    files = {}
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            files[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


class _Timeout(Exception):
    pass


def _status_mb(name: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(name)


def _reset_peak() -> bool:
    """Restart the process's peak-RSS count (VmHWM) from its current RSS, so a case's peak is its
    own and not an earlier case's; False where the kernel does not offer it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_case(c: Case, base: Path) -> dict:
    from graphsd.cli import main

    folder = base / c.name
    folder.mkdir()
    here = os.getcwd()
    os.chdir(folder)
    record: dict = {"name": c.name, "category": c.category}
    try:
        argv = c.setup(folder)
        before = _snapshot(folder)
        own_peak = _reset_peak()
        record["start_mb"] = _status_mb("VmRSS")
        err, out = io.StringIO(), io.StringIO()

        def on_alarm(signum, frame):
            raise _Timeout()

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(CASE_TIMEOUT_S)
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = main(argv)
        except _Timeout:
            code = "timeout"
        except SystemExit as exc:
            code = exc.code
        except BaseException:  # noqa: BLE001 - an escaped exception is what this looks for
            code = "exception"
            err.write(traceback.format_exc())
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        record["seconds"] = time.perf_counter() - t0
        after = _snapshot(folder)
        record.update(
            exit=code,
            stderr=err.getvalue()[-4000:],
            stdout=out.getvalue()[-2000:],
            # the case's own peak where the count could be restarted, else the process's so far
            maxrss_mb=_status_mb("VmHWM") if own_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            removed=sorted(set(before) - set(after)),
            changed=sorted(k for k in set(before) & set(after) if before[k] != after[k]),
            added=sorted(set(after) - set(before)),
            pwned=(folder / "PWNED").exists(),
            temporaries=sorted(str(p.relative_to(folder)) for p in folder.rglob(".graphsd-*")),
        )
    finally:
        os.chdir(here)
    return record


def main(results: str, base: str, names: list[str]) -> None:
    import graphsd.cli  # noqa: F401 - imported before the baseline is taken
    import torch

    torch.set_num_threads(int(os.environ.get("GRAPHSD_TEST_THREADS", "1")))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    records = []
    for c in CASES:
        if names and c.name not in names:
            continue
        records.append(run_case(c, Path(base)))
        Path(results).write_text(json.dumps({"baseline_mb": baseline, "cases": records}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
