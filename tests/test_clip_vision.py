"""ComfyUI's CLIP vision classes (CLIPVisionLoader, CLIPVisionEncode): the files load in
transformers' and OpenCLIP's layouts, the preprocessing is ComfyUI's (checked against
transformers' CLIPImageProcessor, which does the same steps with PIL), and the encoding equals
transformers' CLIPVisionModelWithProjection on a tiny random encoder saved as a real file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from graphsd import Engine, Settings, WorkflowError
from graphsd.std.models.clip_vision import CLIP_MEAN, CLIP_STD, preprocess

U32 = 2.0**-24


def tiny_encoder(seed: int = 0) -> CLIPVisionModelWithProjection:
    """A random CLIP vision encoder of CLIP's shape family: 224-pixel input, 32-pixel patches,
    16 heads (as every SD-ecosystem CLIP vision encoder), gelu (OpenCLIP's)."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=16,
        image_size=224,
        patch_size=32,
        projection_dim=24,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    return CLIPVisionModelWithProjection(config).eval()


def to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' names → OpenCLIP's (``visual.`` prefix, fused in_proj, transposed proj),
    written from OpenCLIP's VisionTransformer attribute names."""
    out = {}
    top = {
        "embeddings.class_embedding": "class_embedding",
        "embeddings.patch_embedding.weight": "conv1.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "pre_layrnorm.weight": "ln_pre.weight",
        "pre_layrnorm.bias": "ln_pre.bias",
        "post_layernorm.weight": "ln_post.weight",
        "post_layernorm.bias": "ln_post.bias",
    }
    layer_names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    for key, value in state.items():
        if key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
            continue
        name = key.removeprefix("vision_model.")
        if name in top:
            out["visual." + top[name]] = value
        elif name.startswith("encoder.layers."):
            index, rest = name[len("encoder.layers.") :].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            if module in layer_names:
                out[f"visual.transformer.resblocks.{index}.{layer_names[module]}.{kind}"] = value
    for key in list(state):
        if key.endswith("self_attn.q_proj.weight") or key.endswith("self_attn.q_proj.bias"):
            index = key.split(".")[3]
            kind = key.rsplit(".", 1)[1]
            parts = [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[f"visual.transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(parts)
    out["text.token_embedding.weight"] = torch.zeros(3, 4)  # the rest of an OpenCLIP model is ignored
    return out


@pytest.fixture(scope="module")
def encoder() -> CLIPVisionModelWithProjection:
    return tiny_encoder()


@pytest.fixture(scope="module")
def models(tmp_path_factory, encoder) -> tuple:
    root = tmp_path_factory.mktemp("models")
    (root / "clip_vision").mkdir()
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, root / "clip_vision" / "tiny_vit.safetensors")
    save_file(to_open_clip(encoder.state_dict()), root / "clip_vision" / "tiny_open_clip.safetensors")
    inputs = tmp_path_factory.mktemp("input")
    rng = np.random.default_rng(3)
    PILImage.fromarray(rng.integers(0, 256, (300, 450, 3), dtype=np.uint8)).save(inputs / "wide.png")
    return root, inputs


def processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )


def test_preprocessing_of_a_224_square_equals_clip_image_processor():
    """No resize: 8-bit levels, CLIP's mean and std, as CLIPImageProcessor on the 8-bit picture.
    Both compute (level / 255 - mean) / std in float32, in two orders: a few roundings apart."""
    pixels = torch.rand(2, 224, 224, 3, generator=torch.Generator().manual_seed(1))
    levels = (pixels * 255).round().to(torch.uint8).numpy()
    ours = preprocess(pixels, 224, crop=True)
    ref = torch.from_numpy(processor()([PILImage.fromarray(a) for a in levels], return_tensors="np")["pixel_values"])
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    assert float((ours - ref).abs().max()) <= 8 * U32 * float(ref.abs().max())


def test_preprocessing_resizes_the_shortest_side_and_cuts_the_centre_like_clip_image_processor():
    """A 300×450 picture: the shortest side to 224 (bicubic), the centre 224 square. torch's
    antialiased bicubic is PIL's filter; PIL rounds its result to 8-bit levels once more, so the
    two may differ by one level (1/255 before normalising) and no more."""
    rng = np.random.default_rng(2)
    smooth = rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)
    picture = np.asarray(PILImage.fromarray(smooth).resize((450, 300), PILImage.Resampling.BILINEAR))
    pixels = torch.from_numpy(picture.copy()).float().unsqueeze(0) / 255
    ours = preprocess(pixels, 224, crop=True)
    ref = torch.from_numpy(processor()(PILImage.fromarray(picture), return_tensors="np")["pixel_values"])
    level = 1 / 255 / min(CLIP_STD)
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    assert float((ours - ref).abs().max()) <= level + 8 * U32 * float(ref.abs().max())
    # crop none squeezes the whole picture: its left edge is the picture's left edge
    squeezed = preprocess(pixels, 224, crop=False)
    assert squeezed.shape == (1, 3, 224, 224) and not torch.equal(squeezed, ours)


def encode_file(models: tuple, clip_name: str, crop: str = "center"):
    """A graphsd workflow of the ComfyUI classes (their names and inputs): load, read the picture, encode."""
    root, inputs = models
    doc = {
        "version": 1,
        "nodes": {
            "vision": {"type": "CLIPVisionLoader", "inputs": {"clip_name": clip_name}},
            "picture": {"type": "LoadImage", "inputs": {"path": str(inputs / "wide.png")}},
            "encode": {
                "type": "CLIPVisionEncode",
                "inputs": {"clip_vision": "@vision.clip_vision", "image": "@picture.image", "crop": crop},
            },
        },
    }
    engine = Engine(Settings(device="cpu", models_dir=str(root), output_dir=str(root / "out")))
    result = engine.run(doc, outputs=["encode"])
    assert result.ok, [str(e) for e in result.errors]
    return result.outputs["encode"]["clip_vision_output"]


@pytest.mark.parametrize("name", ["tiny_vit.safetensors", "tiny_open_clip"])
def test_the_nodes_encode_as_transformers_clip_vision_model(models, encoder, name):
    """Both layouts load into the same encoder; its outputs are transformers' on the same pixels
    (the same float32 computation: bit for bit): image_embeds, last_hidden_state and the
    penultimate layer's hidden states."""
    out = encode_file(models, name)
    pixels = np.asarray(PILImage.open(models[1] / "wide.png").convert("RGB"))
    pixel_values = preprocess(torch.from_numpy(pixels.copy()).float().unsqueeze(0) / 255, 224, crop=True)
    with torch.no_grad():
        ref = encoder(pixel_values=pixel_values, output_hidden_states=True)
    assert torch.equal(out.image_embeds, ref.image_embeds)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(out.penultimate_hidden_states, ref.hidden_states[-2])
    assert out.image_embeds.shape == (1, 24) and out.last_hidden_state.shape == (1, 50, 64)


def test_a_missing_or_foreign_file_is_a_clear_error(models):
    root, _ = models
    save_file({"model.diffusion_model.x": torch.zeros(2)}, root / "clip_vision" / "not_clip.safetensors")
    engine = Engine(Settings(device="cpu", models_dir=str(root), output_dir=str(root / "out")))

    def doc(name: str) -> dict:
        return {"version": 1, "nodes": {"v": {"type": "CLIPVisionLoader", "inputs": {"clip_name": name}}}}

    with pytest.raises(WorkflowError) as info:  # not there: refused before anything runs, naming what is there
        engine.run(doc("nope.safetensors"), outputs=["v"])
    [issue] = info.value.issues
    assert (issue.node, issue.field) == ("v", "clip_name") and "not found" in issue.message and "tiny_vit.safetensors" in issue.message
    result = engine.run(doc("not_clip.safetensors"), outputs=["v"])  # there, but of another kind: the run finds out
    assert not result.ok
    message = str(result.errors[0])
    assert "not a CLIP vision encoder" in message and "clip_name" in message, message


# ---- unCLIP ----------------------------------------------------------------------------------
def diffusers_noised(embeds: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, level: int, noise: torch.Tensor) -> torch.Tensor:
    """StableUnCLIPImg2ImgPipeline's noise_image_embeddings, step by step with diffusers' parts."""
    from diffusers import DDPMScheduler
    from diffusers.models.embeddings import get_timestep_embedding
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    normalizer = StableUnCLIPImageNormalizer(embedding_dim=embeds.shape[-1])
    normalizer.load_state_dict({"mean": mean.unsqueeze(0), "std": std.unsqueeze(0)})
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    levels = torch.tensor([level] * embeds.shape[0])
    with torch.no_grad():
        x = normalizer.unscale(scheduler.add_noise(normalizer.scale(embeds), timesteps=levels, noise=noise))
    emb = get_timestep_embedding(levels, embeds.shape[-1], flip_sin_to_cos=True, downscale_freq_shift=0)
    return torch.cat([x, emb], dim=1)


def test_unclip_noise_augmentation_is_diffusers_stable_unclip_formula():
    """One application: diffusers' normaliser + DDPM squared-cosine noising + level embedding,
    × strength, with the noise ComfyUI draws (seed − 10). diffusers keeps ᾱ in float32 (a
    cumulative product of up to 1000 factors, each rounding once), graphsd in float64."""
    from graphsd.std.models.clip_vision import ClipVisionOutput, NoiseAugmentor, Unclip, unclip_class_labels

    width, seed = 24, 123
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, width, generator=gen)
    mean, std = torch.randn(width, generator=gen) * 0.1, torch.rand(width, generator=gen) + 0.5
    output = ClipVisionOutput(embeds, torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))
    augmentor = NoiseAugmentor(mean.unsqueeze(0), std.unsqueeze(0))
    for augmentation, strength in ((0.0, 1.0), (0.25, 0.7), (1.0, 1.5)):
        ours = unclip_class_labels((Unclip(output, strength, augmentation),), augmentor, seed, width)
        noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(seed - 10))
        ref = diffusers_noised(embeds, mean, std, round(999 * augmentation), noise) * strength
        bound = 4 * 1000 * U32 * float(ref.abs().max() + 1)
        assert ours.shape == (1, 2 * width)
        assert float((ours - ref).abs().max()) <= bound, (augmentation, float((ours - ref).abs().max()))
    assert torch.equal(unclip_class_labels((), augmentor, seed, width), torch.zeros(1, 2 * width))


def test_unclip_conditioning_records_each_application_on_every_entry():
    """ComfyUI's unCLIPConditioning appends to the conditioning's list; strength 0 changes nothing."""
    from graphsd.std.models.clip_vision import UNCLIP_KEY, ClipVisionOutput
    from graphsd.std.nodes.clip_vision import unCLIPConditioning
    from graphsd.types import Conditioning

    output = ClipVisionOutput(torch.ones(1, 4), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))
    cond = Conditioning.of_entries([Conditioning(torch.zeros(1, 2, 8)), Conditioning(torch.ones(1, 2, 8))])
    node = unCLIPConditioning()
    once = node.run(node.Inputs(conditioning=cond, clip_vision_output=output, strength=0.5, noise_augmentation=0.1), None).conditioning
    twice = node.run(node.Inputs(conditioning=once, clip_vision_output=output, strength=1.0, noise_augmentation=0.0), None).conditioning
    assert [[(u.strength, u.noise_augmentation) for u in e.extras[UNCLIP_KEY]] for e in twice.entries()] == [[(0.5, 0.1), (1.0, 0.0)]] * 2
    assert UNCLIP_KEY not in cond.extras
    same = node.run(node.Inputs(conditioning=cond, clip_vision_output=output, strength=0.0, noise_augmentation=0.5), None).conditioning
    assert same is cond
