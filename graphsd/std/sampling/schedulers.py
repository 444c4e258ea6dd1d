"""The built-in samplers: diffusers schedulers built from a model's scheduler config.

Each entry of :data:`SAMPLERS` is a factory ``factory(scheduler_config=dict, schedule=str)``
returning a fresh diffusers scheduler (``set_timesteps``, ``scale_model_input``, ``step``,
``add_noise``). ``schedule`` is ``"normal"`` (the model's own timestep spacing) or ``"karras"``
(the noise levels of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", eq. 5, through diffusers' ``use_karras_sigmas``). The model's training
settings (beta schedule, prediction type, timestep spacing, steps offset) always come from its
config, so a sampler gives the same numbers as a diffusers pipeline using the same scheduler.
DDIM never clips its x0 prediction to [-1, 1] (a pixel-space setting that diffusers' Stable
Diffusion pipelines also switch off for latents).

| name | method | diffusers class |
| --- | --- | --- |
| euler | Euler (Karras et al. 2022, Algorithm 2 without churn) | EulerDiscreteScheduler |
| euler_ancestral | Euler with ancestral noise (k-diffusion) | EulerAncestralDiscreteScheduler |
| heun | Heun's 2nd order (Karras et al. 2022, Algorithm 1) | HeunDiscreteScheduler |
| ddim | DDIM, eta 0 (Song et al. 2020) | DDIMScheduler, clip_sample off |
| lms | linear multistep (k-diffusion) | LMSDiscreteScheduler |
| dpmpp_2m | DPM-Solver++(2M) (Lu et al. 2022) | DPMSolverMultistepScheduler |
| dpmpp_2m_sde | DPM-Solver++(2M) SDE (Lu et al. 2022) | DPMSolverMultistepScheduler, sde-dpmsolver++ |
| unipc | UniPC (Zhao et al. 2023) | UniPCMultistepScheduler |
"""

from __future__ import annotations

import importlib
from functools import partial
from typing import Any, Callable

SCHEDULES = ("normal", "karras")


class UnsupportedSchedule(ValueError):
    """The sampler cannot use the requested noise schedule."""


def build_scheduler(cls_name: str, scheduler_config: dict[str, Any], schedule: str, karras: bool, **overrides: Any):
    """diffusers' scheduler class ``cls_name`` configured from the model's scheduler config, with
    ``overrides`` and the schedule applied. diffusers is imported here, on first use, so that
    starting an engine (``graphsd nodes``, a server, a workflow without samplers) does not pay
    for importing it."""
    if schedule not in SCHEDULES:
        raise UnsupportedSchedule(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if karras:
        overrides["use_karras_sigmas"] = schedule == "karras"
    elif schedule == "karras":
        supported = ", ".join(n for n, f in SAMPLERS.items() if f.keywords["karras"])
        raise UnsupportedSchedule(
            f"the {cls_name} sampler has no karras schedule; use schedule 'normal' or one of: {supported}"
        )
    cls = getattr(importlib.import_module("diffusers"), cls_name)
    return cls.from_config(dict(scheduler_config), **overrides)


SAMPLERS: dict[str, Callable[..., Any]] = {
    "euler": partial(build_scheduler, "EulerDiscreteScheduler", karras=True),
    "euler_ancestral": partial(build_scheduler, "EulerAncestralDiscreteScheduler", karras=False),
    "heun": partial(build_scheduler, "HeunDiscreteScheduler", karras=True),
    "ddim": partial(build_scheduler, "DDIMScheduler", karras=False, clip_sample=False),
    "lms": partial(build_scheduler, "LMSDiscreteScheduler", karras=True),
    "dpmpp_2m": partial(
        build_scheduler, "DPMSolverMultistepScheduler", karras=True, algorithm_type="dpmsolver++", solver_order=2
    ),
    "dpmpp_2m_sde": partial(
        build_scheduler, "DPMSolverMultistepScheduler", karras=True, algorithm_type="sde-dpmsolver++", solver_order=2
    ),
    "unipc": partial(build_scheduler, "UniPCMultistepScheduler", karras=True),
}
"""Sampler name → ``factory(scheduler_config=..., schedule=...)`` (registered by the built-in
plugin through ``graphsd_register_samplers``)."""
