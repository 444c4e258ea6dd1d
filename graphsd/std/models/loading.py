"""Finding checkpoints and loading them into the ModelManager as UNet / Clip / Vae handles.

A model is named by ``path`` in a ``CheckpointLoader`` node. :func:`resolve_model_path` looks, in
order, at:

1. the built-in models shipped in ``graphsd/std/models/builtin/<name>/``,
2. ``<models_dir>/<name>``,
3. ``<models_dir>/checkpoints/<name>``,
4. ``<name>`` as a path (absolute, or relative to the working directory).

What is found is either a diffusers model folder (``model_index.json`` + one folder per
component: ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; SDXL adds
``text_encoder_2/`` and ``tokenizer_2/``) or a single checkpoint file, which
:func:`graphsd.std.models.single_file.load_single_file` converts. Everything loads offline
(``local_files_only=True``). A folder is data, never code: ``model_index.json`` may name
classes of the ``diffusers`` and ``transformers`` packages only.

Each component is loaded once per engine: its ModelManager key is the model's fingerprint
(path, names, sizes and mtimes of its files, see :func:`graphsd.paths.file_fingerprint`) + the component
name + the dtype, so a second ``CheckpointLoader`` of the same files is a ``reuse`` event and a
replaced file is loaded afresh.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from graphsd.paths import file_fingerprint
from graphsd.std.models.family import TOKENIZER_OF_ENCODER, Family, detect_model_info
from graphsd.std.models.formats import WEIGHT_SUFFIXES, ModelFileError
from graphsd.types import Clip, UNet, Vae

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
#: Component folders of a diffusers model, in the order they are loaded.
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
#: The only packages whose classes a model folder's ``model_index.json`` may name.
TRUSTED_LIBRARIES = ("diffusers", "transformers")


class ModelLoadError(ModelFileError):
    """A model could not be found or loaded; the message says where graphsd looked or why."""


def builtin_models_dir() -> Path:
    """Folder of the models shipped inside the package."""
    return Path(__file__).resolve().parent / "builtin"


def candidate_paths(name: str, models_dir: str | Path) -> list[Path]:
    """The places :func:`resolve_model_path` looks at for ``name``, in order."""
    models_dir = Path(models_dir)
    return [builtin_models_dir() / name, models_dir / name, models_dir / "checkpoints" / name, Path(name)]


def resolve_model_path(name: str, models_dir: str | Path) -> Path:
    """The model folder or file ``name`` refers to (see the module docstring for the order)."""
    if not name.strip():
        raise ModelLoadError("no model named: give a built-in name (e.g. graphsd-tiny), a name under the models folder, or a path")
    places = candidate_paths(name, models_dir)
    for place in places:
        if place.is_dir() and (place / "model_index.json").is_file():
            return place.resolve()
        if place.is_file() and place.suffix.lower() in WEIGHT_SUFFIXES:
            return place.resolve()
    looked = "; ".join(str(p) for p in places)
    raise ModelLoadError(
        f"model {name!r} not found. Looked for a diffusers folder (with model_index.json) or a "
        f"{'/'.join(WEIGHT_SUFFIXES)} file at: {looked}. Put the model under the models folder "
        f"(settings.models_dir) or give its path"
    )


@dataclass
class LoadedCheckpoint:
    """The three handles a checkpoint provides."""

    unet: UNet
    clip: Clip
    vae: Vae


def load_checkpoint(manager: Any, path: Path, dtype: str = "fp32", allow_pickle: bool = False) -> LoadedCheckpoint:
    """Load the model at ``path`` (a diffusers folder or a single file, already resolved) into
    ``manager`` and return its handles. Components already held are reused."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    fingerprint = file_fingerprint(path)
    family = None
    if path.is_dir():
        loaders, scheduler_config = _folder_loaders(path, DTYPES[dtype], allow_pickle)
    else:
        loaders, scheduler_config, family = _single_file_loaders(manager, path, fingerprint, dtype, allow_pickle)
    keys = {role: manager.load(f"{fingerprint}:{role}:{dtype}", fn) for role, fn in loaders.items()}
    return build_handles(manager, keys, scheduler_config, family=family)


def build_handles(manager: Any, keys: dict[str, str], scheduler_config: dict[str, Any], family: Family | None = None) -> LoadedCheckpoint:
    """UNet / Clip / Vae handles for components held by ``manager`` under ``keys``
    (role → key), sharing one :class:`~graphsd.std.models.family.ModelInfo` detected from the
    components' configs (``family`` defaults to what the U-Net config says)."""
    encoders = [r for r in TOKENIZER_OF_ENCODER if r in keys]
    tokenizers = {r: manager.get(keys[TOKENIZER_OF_ENCODER[r]]) for r in encoders if TOKENIZER_OF_ENCODER[r] in keys}
    info = detect_model_info(manager.get(keys["unet"]).config, manager.get(keys["vae"]).config, scheduler_config, tokenizers, family)
    info = replace(info, vae_key=keys["vae"])
    unet = UNet(manager, {"unet": keys["unet"]}, info)
    clip = Clip(manager, {r: keys[r] for r in encoders}, info)
    vae = Vae(manager, {"vae": keys["vae"]}, info)
    return LoadedCheckpoint(unet, clip, vae)


def _torch_dtype_kwargs(cls: type, dtype: torch.dtype) -> dict[str, Any]:
    if cls.__module__.startswith("transformers"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def _folder_loaders(path: Path, dtype: torch.dtype, allow_pickle: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loader functions for the components a diffusers folder lists in ``model_index.json``
    (a JSON object: role → ``[library, class name]``, ``[null, null]`` for an absent one)."""
    index = _read_json(path / "model_index.json")
    loaders: dict[str, Any] = {}
    for role in COMPONENTS:
        spec = index.get(role)
        if spec is None:
            continue
        if not (isinstance(spec, list) and len(spec) == 2 and all(x is None or isinstance(x, str) for x in spec)):
            raise ModelLoadError(
                f"{path}/model_index.json: {role} is {spec!r}, expected [library, class name] (e.g. "
                '["diffusers", "UNet2DConditionModel"]) or [null, null]; fix or replace the file'
            )
        if spec[0] is None:
            continue
        if not (path / role).is_dir():
            raise ModelLoadError(f"{path}/model_index.json lists {role} but the {role}/ folder is missing: the copy is incomplete")
        cls = _component_class(path, role, spec[0], spec[1])
        role_dtype = torch.float32 if role == "vae" and _keeps_fp32(index, path / role, dtype) else dtype
        loaders[role] = _component_loader(cls, path / role, role_dtype, allow_pickle, tokenizer=role.startswith("tokenizer"))
    for role in ("unet", "vae"):
        if role not in loaders:
            raise ModelLoadError(f"{path} has no {role}/ folder listed in model_index.json: it is not a complete Stable Diffusion model")
    config_file = path / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no scheduler/scheduler_config.json")
    return loaders, _read_json(config_file)


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from ``file`` of a model folder; anything else is a ModelLoadError."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file} cannot be read as JSON ({exc}): the model folder is damaged; copy it again") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} holds a JSON {type(data).__name__}, not an object: the model folder is damaged; copy it again")
    return data


def _component_class(path: Path, role: str, library: str, name: str | None) -> type:
    """The class ``model_index.json`` names for ``role``. A model folder is data, not code: only
    modules of the installed :data:`TRUSTED_LIBRARIES` are imported (checked before importing),
    and the attribute must be a model class (``torch.nn.Module``) or, for a tokenizer role, a
    transformers tokenizer class."""
    from transformers import PreTrainedTokenizerBase

    where = f"{path}/model_index.json names {library}.{name} for {role}"
    if library.split(".")[0] not in TRUSTED_LIBRARIES:
        raise ModelLoadError(
            f"{where}: refused, graphsd imports classes from {' and '.join(TRUSTED_LIBRARIES)} only "
            f"(a model folder must not make it run other code); use a standard diffusers model folder"
        )
    try:
        module = importlib.import_module(library)
    except ImportError as exc:
        raise ModelLoadError(f"{where}: module {library} cannot be imported ({exc})") from None
    cls = getattr(module, name or "", None)
    base, kind = (
        (PreTrainedTokenizerBase, "tokenizer class (PreTrainedTokenizerBase)")
        if role.startswith("tokenizer")
        else (torch.nn.Module, "model class (torch.nn.Module)")
    )
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ModelLoadError(f"{where}: that is not a {kind} of {library}; the folder's model_index.json is wrong")
    return cls


def _keeps_fp32(index: dict[str, Any], folder: Path, dtype: torch.dtype) -> bool:
    """An SDXL VAE whose config sets ``force_upcast`` (the original one overflows in fp16) stays
    in fp32 when fp16 is asked for, as diffusers' SDXL pipelines upcast it before decoding."""
    config = folder / "config.json"
    if dtype != torch.float16 or "XL" not in str(index.get("_class_name", "")) or not config.is_file():
        return False
    return bool(_read_json(config).get("force_upcast"))


def _component_loader(cls: type, folder: Path, dtype: torch.dtype, allow_pickle: bool, tokenizer: bool):
    if tokenizer:
        return lambda: cls.from_pretrained(str(folder), local_files_only=True)
    weights = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    safetensors = any(p.suffix == ".safetensors" for p in weights)
    if weights and not safetensors and not allow_pickle:
        raise ModelLoadError(
            f"{folder} holds only pickle weights ({', '.join(p.name for p in weights)}); "
            "convert them to .safetensors or, for files you trust, run with --allow-pickle (Settings.allow_pickle: "
            "they are then read with torch.load(weights_only=True), tensors only)"
        )
    kwargs = {"local_files_only": True, "use_safetensors": safetensors, **_torch_dtype_kwargs(cls, dtype)}
    return lambda: cls.from_pretrained(str(folder), **kwargs)


def _single_file_loaders(manager: Any, path: Path, fingerprint: str, dtype: str, allow_pickle: bool):
    """Loader functions for the components of a single checkpoint file. The file is converted
    at most once per load (and not at all when every component is already held): the list of
    components it has and its scheduler config are kept in the manager beside the modules."""
    from graphsd.std.models.single_file import load_single_file

    converted: dict[str, Any] = {}

    def convert() -> dict[str, Any]:
        if not converted:
            converted.update(load_single_file(path, dtype=DTYPES[dtype], allow_pickle=allow_pickle))
        return converted

    def describe() -> dict[str, Any]:
        modules = convert()
        present = [r for r in COMPONENTS if modules.get(r) is not None]
        return {"roles": present, "scheduler_config": dict(modules["scheduler_config"]), "family": modules.get("family")}

    meta = manager.get(manager.load(f"{fingerprint}:contents:{dtype}", describe))
    loaders = {role: (lambda r=role: convert()[r]) for role in meta["roles"]}
    return loaders, meta["scheduler_config"], meta["family"]
