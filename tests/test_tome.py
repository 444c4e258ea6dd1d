"""Token merging (ToMe for SD, Bolya & Hoffman 2023) as ComfyUI's TomePatchModel applies it:
the bipartite soft matching against the paper's algorithm written here with plain loops on a
small tensor; the patched self-attention against the attention computed here from the layer's
weights with the merged tokens as queries and all tokens as keys and values; ratio 0 and undo
change nothing; a ComfyUI prompt runs on graphsd-tiny."""

from __future__ import annotations

import math

import pytest
import sd_tiny
import torch
import torch.nn.functional as F

from graphsd import Engine, Settings
from graphsd.std.models.tome import STRIDE, TomePatch, bipartite_soft_matching, destination_choice


def reference_merge(x: torch.Tensor, height: int, width: int, r: int, choice: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The paper's bipartite soft matching on one item ``x [N, C]``: destinations one per 2x2 cell
    (at ``choice``), the rest sources; each source's most similar destination (cosine); the r
    sources with the highest similarity merged by averaging into their destinations. Returns the
    N - r merged tokens (in no particular order) and the unmerged ``[N, C]`` (each source that was
    merged takes its destination's merged value)."""
    n = height * width
    dst = [(2 * i + int(choice[i, j]) // 2) * width + 2 * j + int(choice[i, j]) % 2 for i in range(height // 2) for j in range(width // 2)]
    src = [t for t in range(n) if t not in dst]

    def cosine(a, b):
        return float(x[a] @ x[b]) / math.sqrt(float(x[a] @ x[a]) * float(x[b] @ x[b]))

    best = {s: max(dst, key=lambda d, s=s: cosine(s, d)) for s in src}
    ranked = sorted(src, key=lambda s: -cosine(s, best[s]))
    merged = set(ranked[:r])
    groups = {d: [d] + [s for s in merged if best[s] == d] for d in dst}
    means = {d: torch.stack([x[t] for t in group]).mean(0) for d, group in groups.items()}
    tokens = [x[s] for s in src if s not in merged] + list(means.values())
    out = torch.stack([means[t] if t in means else means[best[t]] if t in merged else x[t] for t in range(n)])
    return tokens, out


def rows_sorted(t: torch.Tensor) -> torch.Tensor:
    return t[torch.argsort(t[:, 0])]


@pytest.mark.parametrize("height,width,r", [(4, 6, 5), (5, 7, 9), (4, 4, 12), (6, 6, 0)])
def test_bipartite_soft_matching_is_the_papers(height, width, r):
    """Odd sides leave a row / column of sources; r above the number of sources is capped."""
    x = torch.randn(2, height * width, 3, generator=torch.Generator().manual_seed(height + width), dtype=torch.float64)
    choice = torch.randint(4, (height // 2, width // 2), generator=torch.Generator().manual_seed(r))
    matching = bipartite_soft_matching(x, height, width, r, choice)
    merged, back = matching.merge(x), matching.unmerge(matching.merge(x))
    sources = height * width - (height // 2) * (width // 2)
    assert merged.shape == (2, height * width - min(r, sources), 3)
    for b in range(2):
        tokens, unmerged = reference_merge(x[b], height, width, min(r, sources), choice)
        torch.testing.assert_close(rows_sorted(merged[b]), rows_sorted(torch.stack(tokens)), rtol=0, atol=1e-14)
        torch.testing.assert_close(back[b], unmerged, rtol=0, atol=1e-14)
    if r == 0:
        assert torch.equal(back, x)


def test_destination_choice_is_random_per_step_and_layer_and_repeatable():
    a = destination_choice(999, 0, 16, 16)
    assert a.min() >= 0 and a.max() < STRIDE * STRIDE and len(a.unique()) == 4
    assert torch.equal(a, destination_choice(999, 0, 16, 16))
    assert not torch.equal(a, destination_choice(999, 1, 16, 16)) and not torch.equal(a, destination_choice(979, 0, 16, 16))


@pytest.fixture(scope="module")
def unet():
    """A tiny SD1-layout U-Net with self-attention at full resolution (where ToMe acts)."""
    blocks = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return sd_tiny.unet(**blocks).double().eval()


def call(unet, latent, t=500):
    context = torch.randn(latent.shape[0], 5, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        return unet(latent, t, encoder_hidden_states=context, return_dict=False)[0]


def test_ratio_zero_and_undo_change_nothing(unet):
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = call(unet, latent)
    assert TomePatch(0.0).apply("unet", unet) is None
    undo = TomePatch(0.01).apply("unet", unet)  # int(64 x 0.01) = 0 tokens to merge
    assert torch.equal(call(unet, latent), plain)
    undo()
    undo = TomePatch(0.5).apply("unet", unet)
    merged = call(unet, latent)
    assert torch.equal(call(unet, latent), merged)  # the same call draws the same destinations
    undo()
    assert not torch.equal(merged, plain)
    assert torch.equal(call(unet, latent), plain)


def test_patched_self_attention_merges_the_queries_only(unet):
    """The first full-resolution self-attention, captured around the patch: its output equals
    unmerge(softmax(Q' K^T / sqrt(d)) V W_out + b) with Q' the queries of the merged tokens and
    K, V those of all tokens, per head, computed here from the layer's weights."""
    ratio, t = 0.4, 321
    attn = next(m.attn1 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    seen = {}

    def before(module, args, kwargs):
        seen.setdefault("input", args[0])

    def after(module, args, output):
        seen.setdefault("output", output)

    first = attn.register_forward_pre_hook(before, with_kwargs=True)
    undo = TomePatch(ratio).apply("unet", unet)
    last = attn.register_forward_hook(after)
    try:
        call(unet, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64), t)
    finally:
        first.remove()
        last.remove()
        undo()
    x = seen["input"]
    choice = destination_choice(t * 1000, 0, 4, 4)
    matching = bipartite_soft_matching(x, 8, 8, int(64 * ratio), choice)
    heads = attn.heads

    def split(v):
        return v.view(v.shape[0], v.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split(attn.to_q(matching.merge(x))), split(attn.to_k(x)), split(attn.to_v(x))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(1, -1, heads * q.shape[-1])
    expected = matching.unmerge(F.linear(y, attn.to_out[0].weight, attn.to_out[0].bias))
    assert seen["output"].shape == (1, 64, x.shape[-1])
    torch.testing.assert_close(seen["output"], expected, rtol=0, atol=1e-12)


def tome_prompt(ratio: float) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "graphsd-tiny"}},
        "26": {"class_type": "TomePatchModel", "inputs": {"model": ["4", 0], "ratio": ratio}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a red circle"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["26", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
                "seed": 2,
                "steps": 3,
                "cfg": 6.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "tome"}},
    }


@pytest.mark.slow
def test_comfyui_prompt_with_tome_runs_on_graphsd_tiny(tmp_path):
    engine = Engine(Settings(device="cpu", output_dir=str(tmp_path)))
    latents = {}
    for ratio in (0.0, 0.6):
        result = engine.run(tome_prompt(ratio), outputs=["3"])
        assert result.ok, [str(e) for e in result.errors]
        latents[ratio] = result.outputs["3"]["latent"].samples
    plain = tome_prompt(0.0)
    plain["3"]["inputs"]["model"] = ["4", 0]
    del plain["26"]
    unpatched = Engine(Settings(device="cpu", output_dir=str(tmp_path))).run(plain, outputs=["3"]).outputs["3"]["latent"].samples
    assert torch.equal(latents[0.0], unpatched)
    assert torch.isfinite(latents[0.6]).all() and not torch.equal(latents[0.6], unpatched)
