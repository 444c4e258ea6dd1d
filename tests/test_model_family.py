"""Model facts (graphsd.std.models.family): the family and the facts the nodes read are detected
in one place, from the components' configs, whether a model comes as a diffusers folder or as a
single file. Checked against what the files themselves say: diffusers' own pipelines loaded
from the same folders, the released configs bundled with graphsd, and the family a single file
was written as."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sd_tiny
from graphsd.errors import NodeError
from graphsd.memory import ModelManager
from graphsd.std.models.family import TOKENIZER_OF_ENCODER, detect_family, model_info
from graphsd.std.models.loading import load_checkpoint
from graphsd.std.models.single_file import CONFIGS_DIR, FAMILIES, save_single_file
from graphsd.types import Clip

FACTS = ("family", "unet_in_channels", "context_width", "time_embed_dim", "added_embed_width", "latent_downscale",
         "scaling_factor", "shift_factor")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_released_unet_configs_are_their_family(family):
    """The bundled configs are those of SD1.5, SD2.1 and SDXL base, one folder per family."""
    config = json.loads((CONFIGS_DIR / family / "unet" / "config.json").read_text())
    assert detect_family(config) == family


def test_a_handle_without_facts_is_refused_with_its_field():
    handle = Clip(ModelManager(), {"text_encoder": "te"})
    with pytest.raises(NodeError, match="carries no Stable Diffusion model facts.*CheckpointLoader") as refused:
        model_info(handle, "clip")
    assert refused.value.field == "clip"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    return sd_tiny.save_all(tmp_path_factory.mktemp("tiny"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd1", "xl", "refiner"])
def test_folder_facts_match_diffusers(folders, name):
    """What the handles say is what diffusers' pipeline reads from the same folder."""
    from diffusers import DiffusionPipeline

    folder = folders / name
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    loaded = load_checkpoint(ModelManager(), folder)
    info = loaded.unet.info
    assert loaded.clip.info is info and loaded.vae.info is info
    assert info.family == ("sdxl" if "XL" in type(pipe).__name__ else "sd1")
    assert dict(info.scheduler_config) == json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert info.latent_downscale == pipe.vae_scale_factor
    assert (info.scaling_factor, info.shift_factor) == (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor or 0.0)
    assert info.unet_in_channels == pipe.unet.config.in_channels
    encoders = [r for r in TOKENIZER_OF_ENCODER if getattr(pipe, r, None) is not None]
    assert list(info.tokenizers) == list(loaded.clip.keys) == encoders
    for role in encoders:
        assert info.tokenizers[role].get_vocab() == getattr(pipe, TOKENIZER_OF_ENCODER[role]).get_vocab()
    assert info.takes_time_ids == (info.family == "sdxl")
    if info.takes_time_ids:
        # diffusers' SDXL pipelines pass original size + crop + target size (6 numbers), or with
        # requires_aesthetics_score original size + crop + aesthetic score (5)
        expected = 5 if pipe.config.get("requires_aesthetics_score") else 6
        assert info.time_id_count(pipe.text_encoder_2.config.projection_dim) == expected


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_facts_match_the_folder(folders, tmp_path, family):
    """The tiny SD1 model written as a single file of ``family`` loads with the facts of its
    folder, and the family its layout names: also sd2, although its widths are not SD2's (a
    family read from its config alone would say sd1)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folders / "sd1", local_files_only=True)
    components = {"family": family, "scheduler_config": pipe.scheduler.config, **pipe.components}
    path = save_single_file(components, tmp_path / f"{family}.safetensors")
    from_file = load_checkpoint(ModelManager(), path).unet.info
    from_folder = load_checkpoint(ModelManager(), folders / "sd1").unet.info
    assert from_file.family == family and detect_family(pipe.unet.config) == "sd1"
    assert [getattr(from_file, f) for f in FACTS[1:]] == [getattr(from_folder, f) for f in FACTS[1:]]
    assert dict(from_file.scheduler_config) == dict(pipe.scheduler.config)
    assert list(from_file.tokenizers) == list(from_folder.tokenizers) == ["text_encoder"]
