"""Training from nothing on CPU at toy sizes: the workflow runs end to end, the saved folder is
a diffusers Stable Diffusion model, and an interrupted run resumes to exactly the same weights."""

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from graphsd_train.architecture import TextEncoderShape, UNetShape
from graphsd_train.diffusion import CHECKPOINT_NAME, DiffusionTraining, alphas_cumprod, train_diffusion
from graphsd_train.tokenizer import tokenize, train_tokenizer, vocab_info

from graphsd import Engine, Settings
from graphsd.errors import RunInterrupted
from graphsd.events import Progress

pytestmark = pytest.mark.slow  # the fast lane (pytest -m "not slow") skips this module

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = PLUGIN_ROOT.parents[1] / "workflows" / "train_tiny.yaml"
TOY = {
    "count": 32, "resolution": 32, "vae_steps": 12, "vae_batch": 4, "vae_channels": "16,16,16,16",
    "unet_steps": 30, "unet_batch": 8, "unet_lr": 0.003, "unet_channels": "16,32", "text_width": 32, "text_layers": 2,
    "text_heads": 2, "sample_steps": 4, "name": "toy",
}


def test_train_tiny_workflow_trains_saves_reloads_and_generates(tmp_path):
    events = []
    engine = Engine(Settings(output_dir=str(tmp_path), device="cpu", load_entry_points=False, plugins_dirs=[str(PLUGIN_ROOT)]))
    result = engine.run(WORKFLOW, params=TOY, on_event=events.append)
    assert not result.errors, result.errors
    losses = [e.info["loss"] for e in events if isinstance(e, Progress) and e.node_id == "unet"]
    assert len(losses) == TOY["unet_steps"]
    assert sum(losses[-6:]) / 6 < 0.85 * sum(losses[:6]) / 6
    vae_losses = [e.info["loss"] for e in events if isinstance(e, Progress) and e.node_id == "vae"]
    assert sum(vae_losses[-3:]) < sum(vae_losses[:3])

    folder = Path(result.outputs["save"]["path"])
    assert folder == tmp_path / "toy" and (folder / "model_index.json").exists()
    assert (tmp_path / "checkpoints" / "toy" / CHECKPOINT_NAME).exists()
    assert 0.0 <= result.outputs["check"]["score"] <= 1.0 and "expected red circle white" in result.outputs["check"]["report"]
    assert result.outputs["image"]["image"].pixels.shape == (1, 32, 32, 3)

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a blue square on a black background", num_inference_steps=3, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3) and torch.isfinite(torch.from_numpy(image)).all()
    assert pipe.vae.config.scaling_factor != 0.18215


def _toy_run(ckpt_dir, steps=10, stop_at=None):
    torch.manual_seed(123)
    latents = torch.randn(12, 4, 4, 4)
    captions = [f"a {c} square" for c in ("red", "green", "blue")] * 4
    tok = train_tokenizer(captions, ckpt_dir / "tok")
    cfg = DiffusionTraining(steps=steps, batch_size=4, lr=1e-3, warmup=2, seed=3, checkpoint_every=5,
                            unet=UNetShape((16, 32), attention_heads=2, norm_groups=8), text=TextEncoderShape(16, 1, 2))

    def progress(step, total, loss):
        if step == stop_at:
            raise RunInterrupted("train")

    return train_diffusion(latents, tokenize(tok, captions), tokenize(tok, [""])[0], vocab_info(tok), cfg, "cpu", progress, ckpt_dir)


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    straight = _toy_run(tmp_path / "a")
    with pytest.raises(RunInterrupted):
        _toy_run(tmp_path / "b", stop_at=5)
    resumed = _toy_run(tmp_path / "b")
    assert resumed.steps_done == straight.steps_done == 10
    assert resumed.losses == straight.losses
    for net in ("unet", "text_encoder"):
        a, b = getattr(straight, net).state_dict(), getattr(resumed, net).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_noise_schedule_matches_diffusers_ddpm():
    """ᾱ_t = ∏_{i≤t} (1 − β_i), β_i = (√β_start + i·(√β_end − √β_start)/(n − 1))², n = 1000.

    graphsd computes this in float64 and rounds once to float32: relative error ≤ u = 2**-24 (the
    float64 steps add ~n·2**-53, negligible). diffusers computes it all in float32:
    - √β_start, √β_end rounded to float32, then a float32 linspace: each value comes from at most
      ten roundings of numbers no larger than √β_end ≈ 0.11, so it is off by < 1.1·u absolutely,
      < 38·u relatively (every value is ≥ √β_start ≈ 0.029);
    - squared: β is off by < 77·u relatively, so by < 77·u·0.012 < 0.93·u absolutely;
    - 1 − β, one more rounding: each factor (≥ 0.988) is off by < 2·u relatively;
    - the cumulative product: t − 1 float32 multiplications, each rounding by ≤ u relatively.
    So diffusers' ᾱ_t is within (2t + t − 1)·u·(1 + O(n·u)) ≤ 3n·u relatively of the exact value,
    and the two differ by at most (3n + 2)·u relatively (≈ 1.8e-4; a 1 % error in β_end or another
    schedule shape moves the late ᾱ_t by percents)."""
    from diffusers import DDPMScheduler

    n = 1000
    ref = DDPMScheduler(num_train_timesteps=n, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ours = alphas_cumprod({"num_train_timesteps": n, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"})
    assert ours.dtype == ref.alphas_cumprod.dtype == torch.float32 and ours.shape == (n,)
    ours, expected = ours.double(), ref.alphas_cumprod.double()
    u = 2.0**-24
    assert ((ours - expected).abs() <= (3 * n + 2) * u * expected).all()
