"""Textual-inversion embeddings: reading the files of every common format, and finding them by name.

An embedding is a few learned token vectors (``[n, width]``) that stand in a prompt where its
name is written; each vector takes one token position (see :mod:`graphsd.std.text.encode`). The
formats, all recognised by their keys whatever the suffix:

- AUTOMATIC1111 ``.pt``: ``{"string_to_param": {"*": tensor[n, width]}, "name": ..., "step": ...}``
- kohya's and A1111's ``.safetensors``: ``{"emb_params": tensor[n, width]}``
- diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{"<token>": tensor[width] or [n, width]}``
- SDXL (A1111, kohya, ComfyUI): ``{"clip_l": tensor[n, 768], "clip_g": tensor[n, 1280]}``

One-encoder embeddings are for SD1 (768 wide) or SD2 (1024); an SDXL pair gives ``clip_l`` to
the first text encoder and ``clip_g`` to the second (the refiner, which has only the second,
uses ``clip_g``). Any other combination is refused with what the file is for.

Files are read by :mod:`graphsd.std.models.formats`, like every model file: ``.safetensors``
without running code, pickle files (``.pt``, ``.bin``, ...) only with ``--allow-pickle`` and then
with ``torch.load(weights_only=True)``.

**Where.** Embeddings live in ``<models_dir>/embeddings/`` (subfolders allowed) and in the
``embeddings`` folder graphsd ships, if any. A name is the file's path there without its suffix
(``EasyNegative``, ``style/charturnerv2``); a name with a suffix names that file exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from graphsd.std.models.formats import PICKLE_SUFFIXES, ModelFileError, load_pickle, read_weights
from graphsd.std.models.loading import builtin_models_dir
from graphsd.std.text.weighting import EmbeddingRef

#: Suffixes of embedding files, in the order a name without suffix tries them.
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
#: Key of the vectors of a one-encoder (SD1 / SD2) embedding in :attr:`Embedding.vectors`.
SINGLE = "*"
#: Text-encoder role of an SDXL model → the key of its vectors in an SDXL embedding.
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
#: The vector widths of the released models, for saying what an embedding was made for.
_MADE_FOR = {768: "SD1 (768 wide)", 1024: "SD2 (1024 wide)", 1280: "SDXL's second text encoder (1280 wide)"}


class EmbeddingFormatError(ModelFileError):
    """An embedding file is unreadable, in no known format, or does not fit the text encoder."""


@dataclass(frozen=True)
class Embedding:
    """The vectors of one embedding file: ``{SINGLE: [n, width]}`` or, for SDXL,
    ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (the same n)."""

    name: str
    vectors: Mapping[str, torch.Tensor]

    @property
    def count(self) -> int:
        """Token positions the embedding takes in a prompt."""
        return next(iter(self.vectors.values())).shape[0]

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.vectors.values())

    def for_encoder(self, role: str, sdxl: bool, width: int) -> torch.Tensor:
        """The vectors for the text encoder of ``role`` of a model whose token embeddings are
        ``width`` wide (``sdxl``: a model encoded SDXL-style, with ``text_encoder_2``). Refuses
        an embedding made for another kind of model, saying which."""
        if sdxl and SINGLE in self.vectors:
            raise EmbeddingFormatError(
                f"embedding '{self.name}' has one set of vectors, made for {self._made_for(SINGLE)}; this SDXL model "
                "has two text encoders and needs an SDXL embedding (with clip_l and clip_g vectors)"
            )
        if not sdxl and SINGLE not in self.vectors:
            raise EmbeddingFormatError(
                f"embedding '{self.name}' is an SDXL embedding (clip_l and clip_g vectors); this model has one text "
                "encoder (SD1 / SD2): use an embedding made for it"
            )
        key = SDXL_KEYS[role] if sdxl else SINGLE
        vectors = self.vectors[key]
        if vectors.shape[1] != width:
            part = f"{key} vectors" if sdxl else "vectors"
            raise EmbeddingFormatError(
                f"embedding '{self.name}' has {vectors.shape[1]}-wide {part}, made for {self._made_for(key)}, but this "
                f"model's text encoder ({role}) takes {width}-wide token embeddings: use an embedding made for this "
                "model (SD1: 768, SD2: 1024, SDXL: clip_l 768 + clip_g 1280)"
            )
        return vectors

    def _made_for(self, key: str) -> str:
        width = self.vectors[key].shape[1]
        return _MADE_FOR.get(width, f"a model with {width}-wide token embeddings") if key == SINGLE else f"SDXL ({key})"


def parse_embedding(data: object, name: str) -> Embedding:
    """The embedding held by a file's contents (see the module docstring for the formats)."""
    if not isinstance(data, Mapping) or not data:
        raise EmbeddingFormatError(f"'{name}' holds {_what(data)}, not a textual-inversion embedding")
    if "string_to_param" in data:  # AUTOMATIC1111
        params = data["string_to_param"]
        tensors = {k: v for k, v in params.items() if isinstance(v, torch.Tensor)} if isinstance(params, Mapping) else {}
        if len(tensors) != 1:
            raise EmbeddingFormatError(
                f"'{name}' is an A1111 embedding whose string_to_param holds {len(tensors)} tensors; one is expected"
            )
        vectors = {SINGLE: next(iter(tensors.values()))}
    elif "clip_l" in data or "clip_g" in data:  # SDXL
        missing = [k for k in ("clip_l", "clip_g") if not isinstance(data.get(k), torch.Tensor)]
        if missing:
            raise EmbeddingFormatError(f"'{name}' is an SDXL embedding without {' or '.join(missing)} vectors; it needs both")
        vectors = {"clip_l": data["clip_l"], "clip_g": data["clip_g"]}
    elif isinstance(data.get("emb_params"), torch.Tensor):  # kohya, A1111's .safetensors
        vectors = {SINGLE: data["emb_params"]}
    else:  # diffusers: {token: tensor}
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if len(tensors) != 1:
            keys = ", ".join(map(str, list(data)[:8]))
            raise EmbeddingFormatError(
                f"'{name}' is not a textual-inversion embedding in a known format (its keys: {keys}); expected "
                "string_to_param (A1111), emb_params, clip_l + clip_g (SDXL) or one tensor (diffusers learned_embeds)"
            )
        vectors = {SINGLE: next(iter(tensors.values()))}
    checked = {key: _checked(name, key, v) for key, v in vectors.items()}
    if len({v.shape[0] for v in checked.values()}) != 1:
        counts = ", ".join(f"{k}: {v.shape[0]}" for k, v in checked.items())
        raise EmbeddingFormatError(f"'{name}' has different numbers of vectors per text encoder ({counts}); they must match")
    return Embedding(name, checked)


def _checked(name: str, key: str, vectors: torch.Tensor) -> torch.Tensor:
    """``vectors`` as ``[n, width]`` (a single vector ``[width]`` becomes ``[1, width]``), after
    checking that they are finite floating-point numbers."""
    label = "" if key == SINGLE else f" ({key})"
    if not vectors.is_floating_point():
        raise EmbeddingFormatError(f"'{name}'{label} holds {vectors.dtype} numbers, not floating-point vectors")
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or 0 in vectors.shape:
        raise EmbeddingFormatError(f"'{name}'{label} holds a tensor of shape {list(vectors.shape)}; expected [vectors, width]")
    if not torch.isfinite(vectors).all():
        raise EmbeddingFormatError(f"'{name}'{label} holds NaN or infinite values: the file is damaged; download it again")
    return vectors.detach()


def _what(data: object) -> str:
    return "nothing" if isinstance(data, Mapping) else f"a {type(data).__name__}"


def load_embedding(path: str | Path, allow_pickle: bool, field: str | None = None) -> Embedding:
    """Read the embedding in the file at ``path`` (pickle files only when ``allow_pickle``)."""
    path = Path(path)
    name = path.name
    if path.suffix.lower() in PICKLE_SUFFIXES:
        data: object = load_pickle(path, allow_pickle, EmbeddingFormatError, field)
    else:
        data, _ = read_weights(path, allow_pickle, EmbeddingFormatError, field)
    try:
        return parse_embedding(data, name)
    except EmbeddingFormatError as exc:
        raise EmbeddingFormatError(str(exc), field=field) from None


def embedding_folders(models_dir: str | Path) -> list[Path]:
    """Where embeddings are looked for, in order: ``<models_dir>/embeddings``, then the folder
    graphsd ships (the user's files win a name they share)."""
    return [Path(models_dir) / "embeddings", builtin_models_dir() / "embeddings"]


def available_embeddings(models_dir: str | Path) -> dict[str, Path]:
    """Name (path in its folder, ``/``-separated, without suffix) → file of every embedding."""
    found: dict[str, Path] = {}
    for folder in embedding_folders(models_dir):
        if not folder.is_dir():
            continue
        files = [p for p in folder.rglob("*") if p.suffix.lower() in EMBEDDING_SUFFIXES and p.is_file()]
        order = {s: i for i, s in enumerate(EMBEDDING_SUFFIXES)}
        for path in sorted(files, key=lambda p: (p.with_suffix("").as_posix(), order[p.suffix.lower()])):
            found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return found


def bare_names(available: Mapping[str, Path]) -> list[str]:
    """The names a bare prompt word can match (A1111: a file's name, wherever in the folder)."""
    return sorted({name.rsplit("/", 1)[-1] for name in available})


def find_embedding(name: str, models_dir: str | Path, available: Mapping[str, Path], bare: bool = False) -> Path | None:
    """The file ``name`` refers to, or None; ``available`` is :func:`available_embeddings`.

    ``embedding:NAME`` (``bare=False``): the file at that path in an embeddings folder, as
    written or with a suffix added, else the one available name equal to it apart from case; a
    name that leaves the folder (absolute, ``..``) names nothing. A bare word (``bare=True``)
    matches a file's name in any subfolder apart from case, the first in name order when
    several do."""
    if bare:
        matches = sorted(n for n in available if n.rsplit("/", 1)[-1].lower() == name.lower())
        return available[matches[0]] if matches else None
    relative = Path(name.replace("\\", "/"))
    if relative.is_absolute() or ".." in relative.parts or not name.strip():
        return None
    for folder in embedding_folders(models_dir):
        as_written = [folder / relative] if relative.suffix.lower() in EMBEDDING_SUFFIXES else []
        for candidate in as_written + [folder / f"{relative}{s}" for s in EMBEDDING_SUFFIXES]:
            if candidate.is_file():
                return candidate
    folded = [n for n in available if n.lower() == relative.as_posix().lower()]
    return available[folded[0]] if len(folded) == 1 else None


def describe_missing(names: Iterable[str], available: Mapping[str, Path], models_dir: str | Path) -> str:
    """The message for ``embedding:NAME`` references that name no file: which, what there is, and where to put them."""
    names = list(names)
    listed = sorted(available)
    there = ", ".join(listed[:40]) + (f", ... ({len(listed)} in all)" if len(listed) > 40 else "") if listed else "none"
    hint = "; a weight is written (embedding:name:1.2)" if any(":" in n for n in names) else ""
    which = ", ".join(repr(n) for n in names)
    return (
        f"embedding{'s' if len(names) > 1 else ''} {which} not found{hint}. Available embeddings: {there}. "
        f"Put the file (.safetensors, .pt or .bin) in {Path(models_dir) / 'embeddings'}"
    )


def embedding_files(
    refs: Iterable[EmbeddingRef], models_dir: str | Path, available: Mapping[str, Path]
) -> tuple[dict[EmbeddingRef, Path], list[str]]:
    """Resolve a prompt's references: the file of each one found, and the ``embedding:NAME``
    names that name no file (a bare word is a reference only when it names a file)."""
    files: dict[EmbeddingRef, Path] = {}
    missing: list[str] = []
    for ref in refs:
        path = find_embedding(ref.name, models_dir, available, bare=not ref.explicit)
        if path is not None:
            files[ref] = path
        elif ref.name not in missing:
            missing.append(ref.name)
    return files, missing
