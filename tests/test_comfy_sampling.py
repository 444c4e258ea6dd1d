"""ComfyUI's KSamplerAdvanced and custom-sampling classes (SamplerCustom and its parts).

- The sigma nodes against the formulas they implement, written here (k-diffusion's schedules,
  ComfyUI's slicing rules), and BasicScheduler / SDTurboScheduler on SD's noise table rebuilt in
  ``test_samplers_comfy``.
- On a tiny random SD1 model, through ComfyUI API prompts: SamplerCustom with BasicScheduler and
  KSamplerSelect computes what KSampler computes, SamplerCustomAdvanced what SamplerCustom
  computes, KSamplerAdvanced in two stages what KSampler does in one, and the leftover-noise and
  denoised outputs satisfy the Euler step's relation between them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sd_tiny
import torch
from reference import assert_same
from scipy.special import betaincinv
from test_samplers_comfy import SD, expected, sd_sigmas

from graphsd import Engine, Settings, WorkflowError
from graphsd.errors import NodeError
from graphsd.server import objectinfo
from graphsd.std.comfy import comfy_to_workflow, object_info, translate
from graphsd.std.comfy_ui import class_definitions, ui_to_prompt
from graphsd.std.models.family import ModelInfo
from graphsd.std.nodes.comfy_sampling import (
    BasicScheduler,
    BetaSamplingScheduler,
    ExponentialScheduler,
    FlipSigmas,
    KarrasScheduler,
    ModelSamplingDiscrete,
    PolyexponentialScheduler,
    Sampler,
    SamplerCustom,
    SDTurboScheduler,
    Sigmas,
    SplitSigmas,
    SplitSigmasDenoise,
)
from graphsd.std.sampling.kdiffusion import model_sigma_table
from graphsd.types import Conditioning, Latent, UNet

U32 = 2.0**-24

# ---------------------------------------------------------------- sigma nodes (no model weights)


def run(node: type, **inputs):
    return node().run(node.Inputs(**inputs), None)


def sd_handle() -> UNet:
    """A U-Net handle with SD's noise table and no weights (the schedulers read only the table)."""
    return UNet(manager=None, keys={"unet": "none"}, info=ModelInfo(family="sd1", scheduler_config=SD))


def values(sigmas: Sigmas) -> np.ndarray:
    return sigmas.values.double().numpy()


def close(ours: np.ndarray, reference: list[float]) -> None:
    """float32 sigmas against float64 formulas: within a few float32 roundings of values whose
    logs are at most ~8 in size (2e-6 relative, as test_samplers_comfy derives; 1e-5 leaves room)."""
    assert ours.shape == (len(reference),), (ours.tolist(), reference)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 7])
def test_karras_exponential_and_polyexponential_schedulers_follow_their_formulas(steps):
    lo, hi, n = 0.05, 20.0, steps
    ramp = [i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    karras = [(hi ** (1 / 3) + r * (lo ** (1 / 3) - hi ** (1 / 3))) ** 3 for r in ramp] + [0.0]  # Karras et al. 2022, eq. 5
    exponential = [math.exp(math.log(hi) + r * (math.log(lo) - math.log(hi))) for r in ramp] + [0.0]
    poly = [math.exp(math.log(lo) + (1 - r) ** 2 * (math.log(hi) - math.log(lo))) for r in ramp] + [0.0]
    close(values(run(KarrasScheduler, steps=n, sigma_max=hi, sigma_min=lo, rho=3.0).sigmas), karras)
    close(values(run(ExponentialScheduler, steps=n, sigma_max=hi, sigma_min=lo).sigmas), exponential)
    close(values(run(PolyexponentialScheduler, steps=n, sigma_max=hi, sigma_min=lo, rho=2.0).sigmas), poly)


def test_model_free_schedulers_default_to_sds_table_and_refuse_what_has_no_log():
    table = sd_sigmas()
    close(values(run(KarrasScheduler).sigmas), expected("karras", 20))  # SD's sigma_min / sigma_max by default
    assert run(KarrasScheduler).sigmas.values[0] == pytest.approx(table[-1], rel=1e-6)
    for node, field in ((ExponentialScheduler, "sigma_min"), (PolyexponentialScheduler, "sigma_max"), (KarrasScheduler, "rho")):
        with pytest.raises(NodeError) as err:
            run(node, **{field: 0.0})
        assert err.value.field == field


@pytest.mark.parametrize("scheduler", ["normal", "karras", "simple", "beta"])
@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_basic_scheduler_is_the_tail_of_the_schedule_for_steps_over_denoise(scheduler, denoise):
    """ComfyUI's BasicScheduler: the last steps + 1 sigmas of the schedule of int(steps / denoise) steps."""
    steps = 6
    total = int(steps / denoise)
    ours = values(run(BasicScheduler, model=sd_handle(), scheduler=scheduler, steps=steps, denoise=denoise).sigmas)
    close(ours, expected(scheduler, total)[-(steps + 1) :])
    assert run(BasicScheduler, model=sd_handle(), scheduler=scheduler, steps=steps, denoise=0.0).sigmas.values.numel() == 0


def test_basic_scheduler_refuses_a_schedule_longer_than_10000_steps():
    with pytest.raises(NodeError) as err:
        run(BasicScheduler, model=sd_handle(), scheduler="normal", steps=5000, denoise=0.4)
    assert err.value.field == "denoise"


@pytest.mark.parametrize("steps,denoise", [(1, 1.0), (4, 1.0), (10, 1.0), (3, 0.5), (10, 0.25)])
def test_sd_turbo_scheduler_uses_the_distilled_timesteps(steps, denoise):
    """Timesteps 999, 899, ..., 99, from the (10 - int(10 denoise))-th, mapped through the table."""
    table = sd_sigmas()
    start = 10 - int(10 * denoise)
    timesteps = [999 - 100 * k for k in range(10)][start : start + steps]
    close(values(run(SDTurboScheduler, model=sd_handle(), steps=steps, denoise=denoise).sigmas), [table[t] for t in timesteps] + [0.0])


def test_beta_sampling_scheduler_is_the_beta_scheduler_with_other_shapes():
    table, n = sd_sigmas(), 10
    close(values(run(BetaSamplingScheduler, model=sd_handle(), steps=n, alpha=0.6, beta=0.6).sigmas), expected("beta", n))
    ts = [round(float(betaincinv(2.0, 0.5, 1 - i / n)) * 999) for i in range(n)]
    kept = [table[t] for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
    close(values(run(BetaSamplingScheduler, model=sd_handle(), steps=n, alpha=2.0, beta=0.5).sigmas), kept + [0.0])


def test_split_flip_and_split_denoise_slice_as_comfyui():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    split = run(SplitSigmas, sigmas=Sigmas(s), step=2)
    assert split.high_sigmas.values.tolist() == [8.0, 4.0, 2.0] and split.low_sigmas.values.tolist() == [2.0, 1.0, 0.0]
    assert run(SplitSigmas, sigmas=Sigmas(s), step=9).low_sigmas.values.numel() == 0
    flipped = run(FlipSigmas, sigmas=Sigmas(s)).sigmas.values
    assert flipped.tolist() == pytest.approx([0.0001, 1.0, 2.0, 4.0, 8.0]) and s[-1] == 0  # the input is left alone
    # round(4 steps x 0.5) = 2 steps in the second part; round(4 x 0.3) = round(1.2) = 1
    half = run(SplitSigmasDenoise, sigmas=Sigmas(s), denoise=0.5)
    assert half.high_sigmas.values.tolist() == [8.0, 4.0, 2.0] and half.low_sigmas.values.tolist() == [2.0, 1.0, 0.0]
    assert run(SplitSigmasDenoise, sigmas=Sigmas(s), denoise=0.3).low_sigmas.values.tolist() == [1.0, 0.0]
    none = run(SplitSigmasDenoise, sigmas=Sigmas(s), denoise=0.0)  # ComfyUI's [:-0] is empty
    assert none.high_sigmas.values.numel() == 0 and none.low_sigmas.values.tolist() == [0.0]


def custom(sigmas: list[float], latent: Latent):
    cond = Conditioning(torch.zeros(1, 77, 32))
    return SamplerCustom().run(
        SamplerCustom.Inputs(
            model=sd_handle(),
            add_noise=True,
            noise_seed=1,
            cfg=5.0,
            positive=cond,
            negative=cond,
            sampler=Sampler("euler"),
            sigmas=Sigmas(torch.tensor(sigmas)),
            latent_image=latent,
        ),
        None,
    )


def test_sampler_custom_without_sigmas_returns_the_latent_and_refuses_zero_sigmas_before_the_end():
    latent = Latent(torch.randn(1, 4, 8, 8))
    out = custom([], latent)
    assert out.output is latent and out.denoised_output is latent
    with pytest.raises(NodeError) as err:
        custom([5.0, 0.0, 1.0, 0.0], latent)
    assert err.value.field == "sigmas" and "0 only at the end" in str(err.value)
    with pytest.raises(NodeError) as err:
        custom([5.0, float("nan"), 0.0], latent)
    assert err.value.field == "sigmas"


# ---------------------------------------------------------------- import, validation, object_info


def graph(sampler_nodes: dict, output: str = "3") -> dict:
    """A ComfyUI prompt on the model "sd1": text encodes, an empty 64x64 latent, ``sampler_nodes``,
    and a preview of ``output``'s latent."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a red circle"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "blurry"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        **sampler_nodes,
        "8": {"class_type": "VAEDecode", "inputs": {"samples": [output, 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }


GUIDED = {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "cfg": 5.0}


def ksampler(sampler: str, scheduler: str, steps: int, seed: int = 3, latent=("5", 0), denoise: float = 1.0) -> dict:
    return {
        "class_type": "KSampler",
        "inputs": {
            **GUIDED,
            "sampler_name": sampler,
            "scheduler": scheduler,
            "steps": steps,
            "seed": seed,
            "latent_image": list(latent),
            "denoise": denoise,
        },
    }


def advanced(sampler: str, steps: int, start: int, end: int, add_noise: str, leftover: str, latent=("5", 0), seed: int = 3) -> dict:
    return {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            **GUIDED,
            "sampler_name": sampler,
            "scheduler": "karras",
            "steps": steps,
            "noise_seed": seed,
            "latent_image": list(latent),
            "add_noise": add_noise,
            "start_at_step": start,
            "end_at_step": end,
            "return_with_leftover_noise": leftover,
        },
    }


def custom_nodes(
    sampler: str,
    scheduler: str,
    steps: int,
    seed: int = 3,
    latent=("5", 0),
    denoise: float = 1.0,
    split: int | None = None,
    add_noise: bool = True,
) -> dict:
    """KSamplerSelect (10) + BasicScheduler (11) [+ SplitSigmas (12), its high part] + SamplerCustom (3)."""
    nodes = {
        "10": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}},
        "11": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": scheduler, "steps": steps, "denoise": denoise}},
        "3": {
            "class_type": "SamplerCustom",
            "inputs": {
                **GUIDED,
                "add_noise": add_noise,
                "noise_seed": seed,
                "sampler": ["10", 0],
                "sigmas": ["11", 0],
                "latent_image": list(latent),
            },
        },
    }
    if split is not None:
        nodes["12"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["11", 0], "step": split}}
        nodes["3"]["inputs"]["sigmas"] = ["12", 0]
    return nodes


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def engine(models, tmp_path_factory):
    return Engine(Settings(device="cpu", output_dir=str(tmp_path_factory.mktemp("out")), models_dir=str(models)))


@pytest.fixture(scope="module")
def sd1(models):
    """The tiny random SD1 model the prompts name ("sd1"), for the tests that run them."""
    return sd_tiny.save_sd1(models / "sd1")


def test_ksampler_advanced_imports_onto_the_denoise_loops_window(engine, sd1):  # sd1: validation checks that the model the prompt names exists
    doc = comfy_to_workflow(graph({"3": advanced("euler", 10, 2, 6, "disable", "enable")}), engine.nodes)
    loop = doc["nodes"]["3"]["inputs"]
    assert doc["nodes"]["3"]["type"] == "UNetDenoiseLoop"
    assert (loop["start_step"], loop["end_step"], loop["add_noise"], loop["leftover_noise"]) == (2, 6, False, True)
    assert (loop["sampler"], loop["schedule"], loop["convention"], loop["latent"]) == ("euler", "karras", "comfyui", "@5.latent")
    assert doc["nodes"][loop["noise"][1:].split(".")[0]]["inputs"]["seed"] == 3
    first = comfy_to_workflow(graph({"3": advanced("euler", 10, 0, 10000, "enable", "disable")}), engine.nodes)["nodes"]["3"]
    assert first["inputs"]["leftover_noise"] is False and "latent" not in first["inputs"]  # text-to-image from an empty latent
    engine.load(doc)


def comfy_issues(engine, prompt: dict) -> list[tuple[str, str | None, str]]:
    """The problems of a prompt as graphsd serve reports them: (prompt node id, ComfyUI input, message)."""
    try:
        doc, origins = translate(prompt, engine.nodes)
    except WorkflowError as e:
        return [(i.node, i.field, str(i)) for i in e.issues]
    with pytest.raises(WorkflowError) as info:
        engine.load(doc)
    return [(origins[i.node]["id"], origins[i.node]["inputs"].get(i.field, i.field), str(i)) for i in info.value.issues]


@pytest.mark.parametrize(
    "change,field,says",
    [
        ({"end_at_step": 10001}, "end_at_step", "bigger than max"),
        ({"add_noise": "yes"}, "add_noise", "'enable' or 'disable'"),
        ({"sampler_name": "dpm_adaptive"}, "sampler_name", "adaptive step-size"),
    ],
)
def test_ksampler_advanced_refuses_what_cannot_run_on_its_own_inputs(engine, change, field, says):
    prompt = graph({"3": advanced("euler", 10, 0, 10000, "enable", "disable")})
    prompt["3"]["inputs"].update(change)
    issues = comfy_issues(engine, prompt)
    assert any(node == "3" and f == field and says in message for node, f, message in issues), issues


def test_object_info_lists_ksampler_advanced_and_the_custom_sampling_types(engine, tmp_path):
    entry = object_info(tmp_path, tmp_path)["KSamplerAdvanced"]
    assert entry["input_order"]["required"] == [
        "model",
        "add_noise",
        "noise_seed",
        "steps",
        "cfg",
        "sampler_name",
        "scheduler",
        "positive",
        "negative",
        "latent_image",
        "start_at_step",
        "end_at_step",
        "return_with_leftover_noise",
    ]
    assert entry["input"]["required"]["end_at_step"][1] == {"default": 10000, "min": 0, "max": 10000}
    types: dict[str, str] = {}
    for result in engine.pm.hook.graphsd_comfy_types():  # as graphsd serve gathers them
        types.update(result)
    defs = objectinfo.build(engine.nodes, {}, {}, types)
    assert defs["SamplerCustom"]["input"]["required"]["sampler"][0] == "SAMPLER"
    assert defs["SamplerCustom"]["input"]["required"]["sigmas"][0] == "SIGMAS"
    assert defs["SamplerCustomAdvanced"]["input"]["required"]["noise"][0] == "NOISE"
    assert defs["SamplerCustomAdvanced"]["input"]["required"]["guider"][0] == "GUIDER"
    assert defs["SamplerCustom"]["output"] == ["LATENT", "LATENT"]
    assert defs["RandomNoise"]["input"]["required"]["noise_seed"][1]["control_after_generate"] is True


def test_an_unsupported_sampler_name_is_refused_with_its_reason(engine):
    issues = comfy_issues(engine, graph(custom_nodes("dpm_adaptive", "karras", 4)))
    assert any(node == "10" and field == "sampler_name" and "adaptive step-size" in message for node, field, message in issues), issues


def test_a_ui_file_of_the_custom_sampler_maps_its_widgets_in_comfyuis_order(engine, sd1):  # sd1: validation checks that the model the prompt names exists
    """Widget values as the editor saves them: RandomNoise [noise_seed, control], KSamplerSelect
    [sampler_name], BasicScheduler [scheduler, steps, denoise], CFGGuider [cfg]."""

    def node(nid, kind, widgets, inputs=(), outputs=()):
        return {
            "id": nid,
            "type": kind,
            "mode": 0,
            "widgets_values": widgets,
            "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": n, "type": t, "links": links} for n, t, links in outputs],
        }

    ui = {
        "last_node_id": 20,
        "nodes": [
            node(4, "CheckpointLoaderSimple", ["sd1"], outputs=[("MODEL", "MODEL", [1, 2]), ("CLIP", "CLIP", [3, 4]), ("VAE", "VAE", [5])]),
            node(6, "CLIPTextEncode", ["a red circle"], [("clip", "CLIP", 3)], [("CONDITIONING", "CONDITIONING", [6])]),
            node(7, "CLIPTextEncode", ["blurry"], [("clip", "CLIP", 4)], [("CONDITIONING", "CONDITIONING", [7])]),
            node(5, "EmptyLatentImage", [64, 64, 1], outputs=[("LATENT", "LATENT", [8])]),
            node(13, "RandomNoise", [3, "fixed"], outputs=[("NOISE", "NOISE", [9])]),
            node(
                14,
                "CFGGuider",
                [5.0],
                [("model", "MODEL", 1), ("positive", "CONDITIONING", 6), ("negative", "CONDITIONING", 7)],
                [("GUIDER", "GUIDER", [10])],
            ),
            node(10, "KSamplerSelect", ["euler_ancestral"], outputs=[("SAMPLER", "SAMPLER", [11])]),
            node(11, "BasicScheduler", ["karras", 4, 1.0], [("model", "MODEL", 2)], [("SIGMAS", "SIGMAS", [12])]),
            node(
                3,
                "SamplerCustomAdvanced",
                [],
                [
                    ("noise", "NOISE", 9),
                    ("guider", "GUIDER", 10),
                    ("sampler", "SAMPLER", 11),
                    ("sigmas", "SIGMAS", 12),
                    ("latent_image", "LATENT", 8),
                ],
                [("output", "LATENT", [13]), ("denoised_output", "LATENT", [])],
            ),
            node(8, "VAEDecode", [], [("samples", "LATENT", 13), ("vae", "VAE", 5)], [("IMAGE", "IMAGE", [14])]),
            node(9, "PreviewImage", [], [("images", "IMAGE", 14)]),
        ],
        "links": [
            [1, 4, 0, 14, 0, "MODEL"],
            [2, 4, 0, 11, 0, "MODEL"],
            [3, 4, 1, 6, 0, "CLIP"],
            [4, 4, 1, 7, 0, "CLIP"],
            [5, 4, 2, 8, 1, "VAE"],
            [6, 6, 0, 14, 1, "CONDITIONING"],
            [7, 7, 0, 14, 2, "CONDITIONING"],
            [8, 5, 0, 3, 4, "LATENT"],
            [9, 13, 0, 3, 0, "NOISE"],
            [10, 14, 0, 3, 1, "GUIDER"],
            [11, 10, 0, 3, 2, "SAMPLER"],
            [12, 11, 0, 3, 3, "SIGMAS"],
            [13, 3, 0, 8, 0, "LATENT"],
            [14, 8, 0, 9, 0, "IMAGE"],
        ],
    }
    prompt = ui_to_prompt(ui, class_definitions(engine.nodes))
    assert prompt["13"]["inputs"] == {"noise_seed": 3}
    assert prompt["14"]["inputs"] == {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "cfg": 5.0}
    assert prompt["10"]["inputs"] == {"sampler_name": "euler_ancestral"}
    assert prompt["11"]["inputs"] == {"model": ["4", 0], "scheduler": "karras", "steps": 4, "denoise": 1.0}
    assert prompt["3"]["inputs"] == {
        "noise": ["13", 0],
        "guider": ["14", 0],
        "sampler": ["10", 0],
        "sigmas": ["11", 0],
        "latent_image": ["5", 0],
    }
    engine.load(ui)


# ---------------------------------------------------------------- sampling on a tiny model


def latent_of(engine, prompt: dict, node: str = "3", output: str | None = None) -> torch.Tensor:
    result = engine.run(comfy_to_workflow(prompt, engine.nodes), outputs=[node])
    assert result.ok, [str(e) for e in result.errors]
    outputs = result.outputs[node]
    return outputs[output or next(iter(outputs))].samples


@pytest.mark.slow
@pytest.mark.parametrize("sampler,scheduler", [("euler_ancestral", "karras"), ("dpmpp_2m_sde", "normal"), ("heun", "simple")])
def test_sampler_custom_with_basic_scheduler_is_ksampler(engine, sd1, sampler, scheduler):
    """The same sigmas, the same start and the same per-step noise through the same code: the same
    float operations in the same order, so the latents are equal bit for bit."""
    ours = latent_of(engine, graph(custom_nodes(sampler, scheduler, 4)))
    theirs = latent_of(engine, graph({"3": ksampler(sampler, scheduler, 4)}))
    assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_sampler_custom_image_to_image_is_ksampler_with_denoise(engine, sd1):
    """BasicScheduler's denoise 0.6 and KSampler's: the last 3 of int(3 / 0.6) = 5 steps, noise
    added at the first kept sigma."""
    first = {"2": ksampler("euler", "karras", 3, seed=1)}
    ours = latent_of(engine, graph({**first, **custom_nodes("dpmpp_2m", "karras", 3, latent=("2", 0), denoise=0.6)}))
    theirs = latent_of(engine, graph({**first, "3": ksampler("dpmpp_2m", "karras", 3, latent=("2", 0), denoise=0.6)}))
    assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_sampler_custom_advanced_is_sampler_custom(engine, sd1):
    """RandomNoise + CFGGuider is SamplerCustom's noise_seed + cfg; DisableNoise is add_noise off
    with the per-step noise seeded with 0; BasicGuider is CFGGuider at cfg 1 (one pass, no negative)."""

    def advanced_nodes(noise: dict, guider: dict, latent=("5", 0)) -> dict:
        return {
            "10": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}},
            "11": {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "karras", "steps": 3, "denoise": 1.0}},
            "13": noise,
            "14": guider,
            "3": {
                "class_type": "SamplerCustomAdvanced",
                "inputs": {
                    "noise": ["13", 0],
                    "guider": ["14", 0],
                    "sampler": ["10", 0],
                    "sigmas": ["11", 0],
                    "latent_image": list(latent),
                },
            },
        }

    random_noise = {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}}
    cfg = {"class_type": "CFGGuider", "inputs": GUIDED}
    assert torch.equal(
        latent_of(engine, graph(advanced_nodes(random_noise, cfg))), latent_of(engine, graph(custom_nodes("euler_ancestral", "karras", 3)))
    )

    start = {"2": ksampler("euler", "karras", 2, seed=1)}
    no_noise = {"class_type": "DisableNoise", "inputs": {}}
    ours = latent_of(engine, graph({**start, **advanced_nodes(no_noise, cfg, latent=("2", 0))}))
    theirs = latent_of(engine, graph({**start, **custom_nodes("euler_ancestral", "karras", 3, seed=0, latent=("2", 0), add_noise=False)}))
    assert torch.equal(ours, theirs)

    basic = {"class_type": "BasicGuider", "inputs": {"model": ["4", 0], "conditioning": ["6", 0]}}
    one = {"class_type": "CFGGuider", "inputs": {**GUIDED, "cfg": 1.0}}
    assert torch.equal(
        latent_of(engine, graph(advanced_nodes(random_noise, basic))), latent_of(engine, graph(advanced_nodes(random_noise, one)))
    )


@pytest.mark.slow
def test_ksampler_advanced_in_two_stages_is_one_ksampler(engine, sd1):
    """Steps 0 → 10 of 20 with leftover noise, then 10 → 20 without adding noise: the second stage
    starts where the first stopped, at the same sigma, so Euler makes the same 20 steps on the same
    numbers, in the same float operations: the latents are equal bit for bit (the tolerance is 0).
    (A multistep or stochastic sampler restarts its history or its noise at the split.)"""
    stages = {
        "2": advanced("euler", 20, 0, 10, "enable", "enable"),
        "3": advanced("euler", 20, 10, 10000, "disable", "disable", latent=("2", 0)),
    }
    assert torch.equal(latent_of(engine, graph(stages)), latent_of(engine, graph({"3": ksampler("euler", "karras", 20)})))


def euler_relation(before: torch.Tensor, after: torch.Tensor, denoised: torch.Tensor, s: float, s_next: float) -> None:
    """Euler's step from ``before`` at ``s`` to ``after`` at ``s_next`` with the estimate
    ``denoised``: after = D + (before - D) s_next / s. graphsd computes it as before + (before -
    D) / s (s_next - s) in float32: about 4 roundings, each within U32 of values up to M = max
    |before|, |D|, |after|, and ``denoised`` itself may carry 3 more (when it is the result of a
    step to 0); the sigmas here (the formula's, float64) are within 1e-5 relative of graphsd's
    float32 ones, which moves the ratio by 2e-5."""
    b, a, d = before.double(), after.double(), denoised.double()
    predicted = d + (b - d) * (s_next / s)
    magnitude = max(float(t.abs().max()) for t in (b, a, d))
    bound = 16 * U32 * magnitude * 2 + 2e-5 * float((b - d).abs().max())
    diff = float((predicted - a).abs().max())
    assert diff <= bound, (diff, bound)


@pytest.mark.slow
def test_ksampler_advanced_leftover_noise_stops_at_the_end_steps_sigma(engine, sd1):
    """Karras sigmas s_0..s_8 (the formula), end_at_step 5: with leftover noise the last Euler step
    goes from s_4 to s_5; without, from s_4 to 0, which lands on the denoised estimate D at s_4.
    With E the latent after 4 steps: leftover = D + (E - D) s_5 / s_4 and disabled = D."""
    s = expected("karras", 8)

    def run_to(end: int, leftover: str) -> torch.Tensor:
        return latent_of(engine, graph({"3": advanced("euler", 8, 0, end, "enable", leftover)}))

    before, left, full = run_to(4, "enable"), run_to(5, "enable"), run_to(5, "disable")
    euler_relation(before, left, full, s[4], s[5])
    assert not torch.allclose(left, full)  # noise is left


@pytest.mark.slow
def test_denoised_output_is_the_estimate_at_the_last_steps_start(engine, sd1):
    """SamplerCustom on the first 4 Karras sigmas (SplitSigmas at 3) stops at s_3 with noise left;
    its denoised_output is D at s_2, and the Euler step from the latent at s_2 (split at 2) to s_3
    relates them. A schedule ending at 0 with dpmpp_2m ends on the estimate itself."""
    s = expected("karras", 6)
    high = graph(custom_nodes("euler", "karras", 6, split=3))
    left, denoised = latent_of(engine, high, output="output"), latent_of(engine, high, output="denoised_output")
    before = latent_of(engine, graph(custom_nodes("euler", "karras", 6, split=2)), output="output")
    euler_relation(before, left, denoised, s[2], s[3])
    assert not torch.allclose(left, denoised)
    full = graph(custom_nodes("dpmpp_2m", "karras", 3))
    assert torch.equal(latent_of(engine, full, output="output"), latent_of(engine, full, output="denoised_output"))


# ---------------------------------------------------------------- ModelSamplingDiscrete


def patched(sampling: str, zsnr: bool = False) -> UNet:
    return run(ModelSamplingDiscrete, model=sd_handle(), sampling=sampling, zsnr=zsnr).model


def zsnr_sigmas() -> np.ndarray:
    """Lin et al. 2024, Alg. 1 on SD's table: sqrt(alpha_bar) shifted to end at 0 and scaled to
    keep its start; the last alpha_bar then set to ComfyUI's 4.8973451890853435e-08."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    root = np.sqrt(np.cumprod(1 - betas))
    abar = ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    abar[-1] = 4.8973451890853435e-08
    return np.sqrt((1 - abar) / abar)


def test_zsnr_rescales_the_table_to_zero_terminal_snr():
    s, n = zsnr_sigmas(), 10
    assert s[-1] == pytest.approx(4518.6, rel=1e-4)
    ours = values(run(BasicScheduler, model=patched("v_prediction", zsnr=True), scheduler="simple", steps=n).sigmas)
    close(ours, [s[999 - int(i * 1000 / n)] for i in range(n)] + [0.0])
    assert patched("eps").info.scheduler_config["rescale_betas_zero_snr"] is False


def test_lcm_samples_the_50_distilled_timesteps():
    """ComfyUI's ModelSamplingDiscreteDistilled: the table's entries at timesteps 19, 39, ..., 999;
    a timestep t maps to entry (t - 19) / 20, log-linear between entries (the normal scheduler)."""
    distilled = sd_sigmas()[19::20]
    lcm = patched("lcm")
    close(
        values(run(BasicScheduler, model=lcm, scheduler="simple", steps=4).sigmas),
        [distilled[49 - int(i * 50 / 4)] for i in range(4)] + [0.0],
    )

    def at(t):
        k = (t - 19) / 20
        lo, hi = math.floor(k), math.ceil(k)
        return math.exp((1 - (k - lo)) * math.log(distilled[lo]) + (k - lo) * math.log(distilled[hi]))

    close(values(run(BasicScheduler, model=lcm, scheduler="normal", steps=4).sigmas), [at(t) for t in np.linspace(999, 19, 4)] + [0.0])
    table = model_sigma_table(lcm, "model")
    assert [int(table.timestep(s)) for s in (distilled[0], distilled[24], distilled[49], sd_sigmas()[500])] == [19, 499, 999, 499]


@pytest.mark.parametrize("sampling", ["eps", "v_prediction", "x0", "lcm"])
def test_model_sampling_turns_the_unet_output_into_the_denoised_estimate(sampling):
    """Karras et al. 2022, table 1 (VP) for eps; Salimans & Ho 2022 for v; x0 is the output; an LCM
    adds the consistency boundary condition at 10 x its timestep (Luo et al. 2023, sigma_data 0.5)."""
    table = model_sigma_table(patched(sampling), "model")
    x, out = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    sigma = float(table.sigmas[24])
    ours = table.denoised(x, out, sigma)
    if sampling == "eps":
        reference = x - sigma * out
    elif sampling == "v_prediction":
        reference = x / (sigma**2 + 1) - sigma / math.sqrt(sigma**2 + 1) * out
    elif sampling == "x0":
        reference = out
    else:
        s = 10 * 499  # entry 24 of the distilled table is timestep 499
        reference = 0.25 / (s**2 + 0.25) * x + s / math.sqrt(s**2 + 0.25) * (x - sigma * out)
    torch.testing.assert_close(ours, reference, rtol=4 * 2.0**-52, atol=4 * 2.0**-52 * float(x.abs().max() + sigma * out.abs().max()))


def test_model_sampling_discrete_imports_by_name_and_refuses_other_samplings(engine):
    prompt = graph(custom_nodes("euler", "karras", 3))
    prompt["20"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["4", 0], "sampling": "lcm", "zsnr": True}}
    prompt["3"]["inputs"]["model"] = prompt["11"]["inputs"]["model"] = ["20", 0]
    doc = comfy_to_workflow(prompt, engine.nodes)
    assert doc["nodes"]["20"] == {"type": "ModelSamplingDiscrete", "inputs": {"model": "@4.unet", "sampling": "lcm", "zsnr": True}}
    assert doc["nodes"]["3"]["inputs"]["model"] == "@20.model"
    engine.load(doc)
    prompt["20"]["inputs"]["sampling"] = "edm"
    assert any(node == "20" and field == "sampling" for node, field, _ in comfy_issues(engine, prompt))


def unet_reference(folder, x: torch.Tensor, sigma: float, timestep: int) -> torch.Tensor:
    """The tiny model's U-Net output on x / sqrt(sigma^2 + 1) at ``timestep`` with the prompt "a red
    circle" encoded as diffusers' encode_prompt encodes it (CLIP's last hidden state), in float64."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True).double()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).double()
    ids = tokenizer("a red circle", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        context = encoder(ids)[0]
        return unet(x / math.sqrt(sigma**2 + 1), timestep, encoder_hidden_states=context).sample


def model_sampling_nodes(sampling: str, zsnr: bool, sigma: float | None) -> dict:
    """graphsd's nodes in float64: one Euler step from ``sigma`` (None: the table's largest) to 0 with
    the patched model and no guidance, from an empty latent with the noise of seed 5."""
    schedule = (
        {"type": "BasicScheduler", "inputs": {"model": "@patch.model", "scheduler": "normal", "steps": 1}}
        if sigma is None
        else {"type": "ExponentialScheduler", "inputs": {"steps": 1, "sigma_max": sigma, "sigma_min": sigma}}
    )
    return {
        "version": 1,
        "nodes": {
            "model": {"type": "CheckpointLoader", "inputs": {"path": "sd1", "dtype": "fp64"}},
            "patch": {"type": "ModelSamplingDiscrete", "inputs": {"model": "@model.unet", "sampling": sampling, "zsnr": zsnr}},
            "pos": {"type": "TextEncode", "inputs": {"clip": "@model.clip", "text": "a red circle"}},
            "empty": {"type": "EmptyLatent", "inputs": {"width": 64, "height": 64}},
            "sigmas": schedule,
            "sampler": {"type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "guider": {"type": "BasicGuider", "inputs": {"model": "@patch.model", "conditioning": "@pos.cond"}},
            "noise": {"type": "RandomNoise", "inputs": {"noise_seed": 5}},
            "run": {
                "type": "SamplerCustomAdvanced",
                "inputs": {
                    "noise": "@noise.noise",
                    "guider": "@guider.guider",
                    "sampler": "@sampler.sampler",
                    "sigmas": "@sigmas.sigmas",
                    "latent_image": "@empty.latent",
                },
            },
        },
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "sampling,zsnr,at,timestep",
    [("v_prediction", True, None, 999), ("x0", False, 300, 300), ("eps", False, None, 999), ("lcm", False, 500, 499)],
)
def test_model_sampling_discrete_reaches_the_sampler(engine, sd1, sampling, zsnr, at, timestep):
    """One Euler step to 0 lands on D(x, sigma): graphsd's latent against D computed here from the
    U-Net called directly, x = noise * sqrt(1 + sigma^2) at the table's largest sigma (zsnr: about
    4519) or noise * sigma below it, the U-Net at the timestep the model's table gives (an LCM's
    nearest distilled one: 499 for sigma_500), and the formula of the sampling type."""
    sigma_at = None if at is None else float(sd_sigmas()[at])
    result = engine.run(model_sampling_nodes(sampling, zsnr, sigma_at), outputs=["run", "sigmas"])
    assert result.ok, [str(e) for e in result.errors]
    sigma = float(result.outputs["sigmas"]["sigmas"].values[0])
    if at is None:
        assert sigma == pytest.approx((zsnr_sigmas() if zsnr else sd_sigmas())[-1], rel=1e-5)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)).double()
    x = noise * (math.sqrt(1 + sigma**2) if at is None else sigma)
    out = unet_reference(sd1, x, sigma, timestep)
    if sampling == "v_prediction":
        reference = x / (sigma**2 + 1) - sigma / math.sqrt(sigma**2 + 1) * out
    elif sampling == "x0":
        reference = out
    else:
        reference = x - sigma * out
        if sampling == "lcm":
            s = 10.0 * timestep
            reference = 0.25 / (s**2 + 0.25) * x + s / math.sqrt(s**2 + 0.25) * reference
    assert_same(result.outputs["run"]["output"].samples, reference, sampling)
