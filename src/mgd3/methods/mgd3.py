"""Method `mgd3`: Mode discovery -> Mode guidance -> Stop guidance
(Chan-Santiago et al., "MGD³: Mode-Guided Dataset Distillation using Diffusion Models", ICML 2025).

Image k of class c is guided toward mode k of class c for the steps with index > t_stop, or, with
--t-stop-timestep T, for the steps whose training timestep is > T (the paper's Stable Diffusion
variant stops at 500). The manifest records both the index and the timestep where guidance stopped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mgd3.errors import Mgd3Error
from mgd3.core.guidance import GUIDANCE_FORMS, ModeGuidance, StopWindow
from mgd3.methods import METHODS, Batch, Method, as_tensor_modes, check_finite, class_modes_progress, option
from mgd3.core.mode_discovery import MODE_FINDERS, ClassModes, find_modes


@dataclass(frozen=True)
class MGD3Options:
    lam: float = option(0.1, "mode guidance scale λ (paper: 0.1; a model's mgd3.json may recommend "
                                 "another)", flag="--lambda")
    t_stop: int | None = option(None, "stop guidance: guide while step index > t_stop (default steps // 2: "
                                      "25 of 50 guides the first 24 steps; -1 every step; steps none)")
    t_stop_timestep: int | None = option(None, "stop guidance by training timestep: guide while the step's "
                                               "training timestep > T (the paper's SD variant: 500); excludes "
                                               "--t-stop")
    modes: str = option("kmeans", "mode discovery: kmeans (centroids), kmeans-closest (nearest real "
                                  "latents), random, gmm, bisecting, spectral, dbscan")
    guidance_form: str = option("auto", "how guidance enters the update: ddpm (official code), ddim "
                                        "(paper Eq. 6), x0 (interpolate x̂0 toward the mode); auto "
                                        "picks by sampler", choices=GUIDANCE_FORMS)
    mode_seed: int = option(0, "random_state of the clustering (official: 0)")

    def __post_init__(self):
        # what needs no model is refused when the options are made, before any model or data loads
        check_finite("--lambda", self.lam)
        if self.t_stop_timestep is not None and self.t_stop is not None:
            raise Mgd3Error("--t-stop and --t-stop-timestep are mutually exclusive (give one; a model's "
                            "mgd3.json may recommend --t-stop)")


@METHODS.register("mgd3")
class MGD3(Method):
    name = "mgd3"
    Options = MGD3Options

    def __init__(self, options: MGD3Options | None = None):
        super().__init__(options or MGD3Options())
        self.class_modes: dict[int, ClassModes] = {}
        self.stop_index: int | None = None  # guidance while step index > stop_index (set by validate)
        self.stop_info: dict = {}

    @classmethod
    def resolve_options(cls, options: MGD3Options, sampler) -> MGD3Options:
        """The default stop index is half the run's steps (the paper's 25 of 50)."""
        if options.t_stop is None and options.t_stop_timestep is None:
            return dataclasses.replace(options, t_stop=sampler.steps // 2)
        return options

    def validate(self, ctx):
        o = self.options
        steps = ctx.sampler.steps
        timesteps = [int(t) for t in ctx.plan.timesteps]  # ascending with the index
        if o.t_stop_timestep is not None:
            n_train = len(ctx.backend.betas)
            if isinstance(o.t_stop_timestep, bool) or not -1 <= o.t_stop_timestep <= n_train - 1:
                raise Mgd3Error(f"--t-stop-timestep must be in -1..{n_train - 1} (training timesteps), "
                                f"got {o.t_stop_timestep}")
            # guided while timesteps[i] > T  <=>  i > (the last index whose timestep is <= T)
            self.stop_index = max((i for i, t in enumerate(timesteps) if t <= o.t_stop_timestep), default=-1)
        else:
            t_stop = o.t_stop if o.t_stop is not None else self.resolve_options(o, ctx.sampler).t_stop
            if not -1 <= t_stop <= steps:
                raise Mgd3Error(f"--t-stop must be in -1..{steps} for {steps} steps, got {t_stop}")
            self.stop_index = t_stop
        s = self.stop_index
        off, last = min(s, steps - 1), s + 1  # the first step without guidance, the last one with it
        self.stop_info = {
            "t_stop": s, "t_stop_timestep": o.t_stop_timestep, "guided_steps": steps - 1 - off if s >= 0 else steps,
            "stopped_at": None if s < 0 else {"index": off, "timestep": timesteps[off]},
            "last_guided": None if last > steps - 1 else {"index": last, "timestep": timesteps[last]},
        }
        MODE_FINDERS.get(o.modes)
        if o.guidance_form not in GUIDANCE_FORMS:
            raise Mgd3Error(f"unknown --guidance-form {o.guidance_form!r}; known: {', '.join(GUIDANCE_FORMS)}")
        if o.guidance_form == "ddpm" and ctx.sampler.sampler == "ddim" and ctx.sampler.eta == 0:
            raise Mgd3Error("--guidance-form ddpm does nothing with DDIM at eta 0 (σ = 0); use ddim or x0")
        ctx.check_class_sizes()

    def prepare(self, ctx):
        latents = ctx.real_latents()
        for c in class_modes_progress(ctx, "modes"):
            self.class_modes[c.index] = find_modes(self.options.modes, latents[c.index].numpy(), ctx.ipc,
                                                   self.options.mode_seed)

    def generate(self, ctx, items):
        shape = ctx.backend.latent_shape
        targets = torch.cat([as_tensor_modes(self.class_modes[it.cls.index].points[it.index], shape)
                             for it in items]).to(ctx.backend.device)  # (B, C, h, w)
        o = self.options
        guide = StopWindow(ModeGuidance(targets, o.lam, o.guidance_form), self.stop_index)
        return Batch(ctx.sample(items, guidance=[guide]), mode_ids=[it.index for it in items])

    def manifest_info(self):
        per_class = {str(c): m.info for c, m in self.class_modes.items()}
        return {"stop_guidance": self.stop_info,
                "mode_discovery": {"finder": self.options.modes, "k": "ipc",
                                   "random_state": self.options.mode_seed,
                                   "assignment": "image k of a class is guided toward mode k",
                                   "per_class": per_class}}
