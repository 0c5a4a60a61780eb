"""Stage: distillation methods. A method turns (model, real data, IPC, seed) into latents or
images for a list of items; the shared driver (`mgd3.run.driver`) batches, decodes and writes.

A new method is one file in this package that subclasses `Method` and registers itself with
`@METHODS.register("name")`; every module here is imported when the registry is first used.
Method options are a dataclass (`Options`) whose fields carry their CLI flag and help text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mgd3.backends.recommended import SAMPLER_RECOMMENDATIONS
from mgd3.config import RANDOM_STATE_MAX, Rule, convert
from mgd3.errors import Mgd3Error
from mgd3.registry import Registry
from mgd3.core.sampling import CFGDenoiser, Guidance, Plan, noise_levels, randn_per_item, sample

if TYPE_CHECKING:
    from mgd3.backends import Backend
    from mgd3.backends.base import Recommendation


def option(default: Any, help: str, flag: str | None = None, choices: Sequence[str] | None = None):
    """A method option: a dataclass field that also describes its CLI flag."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


def option_flag(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


DEFAULT_STEPS = 50  # sampling steps when neither the command line nor the model's mgd3.json sets them


@dataclass
class SamplerConfig:
    sampler: str = "ddpm"
    steps: int | None = None  # None: the model's recommendation for the IPC and method, else DEFAULT_STEPS
    cfg: float | None = None  # None: the model's recommended value, else 4.0 (DiT-XL/2)
    cfg_channels: int | None = None  # None: all latent channels; 3: the original DiT quirk
    eta: float = 0.0  # DDIM only
    # CFG only where the noise level σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) is in (LOW, HIGH], scale 1 elsewhere
    # (mgd3.core.sampling.CFGDenoiser); None: the model's recommendation, else CFG at every step
    cfg_interval: tuple[float, float] | None = None


def resolve_sampler(sampler: SamplerConfig, recommendation: "Recommendation | None", *,
                    sample: bool = True) -> SamplerConfig:
    """`sampler` with every setting the user left unset filled in from the model's mgd3.json at
    this IPC and method (`Backend.defaults_at`), else the defaults (DEFAULT_STEPS, CFG 4.0 as
    DiT-XL/2, CFG at every step). Without a model (`recommendation` None) only the steps are
    filled in. `sample` False (a method that does not sample): the steps and interval are not
    taken from the model, as nothing uses them."""
    if recommendation is None:
        return sampler if sampler.steps is not None else dataclasses.replace(sampler, steps=DEFAULT_STEPS)
    rec = recommendation.settings
    steps, scale, interval = sampler.steps, sampler.cfg, sampler.cfg_interval
    if steps is None:
        steps = int(rec.get("steps", DEFAULT_STEPS)) if sample else DEFAULT_STEPS
    if scale is None:
        scale = float(rec.get("cfg", 4.0))
    if interval is None and sample and rec.get("cfg_interval") is not None:
        interval = tuple(rec["cfg_interval"])
    return dataclasses.replace(sampler, steps=steps, cfg=scale, cfg_interval=interval)


@dataclass(frozen=True)
class ClassInfo:
    index: int  # position in the data's class list
    class_id: str
    name: str
    label: int  # the model's class label


@dataclass(frozen=True)
class Item:
    cls: ClassInfo
    index: int  # k = 0 .. IPC-1 within the class
    seed: int  # the seed of this image's generator


def item_seed(seed: int, class_id: str, index: int) -> int:
    """A stable 63-bit seed from (global seed, class, index): independent of batching and ranks."""
    h = hashlib.sha256(f"mgd3/{seed}/{class_id}/{index}".encode()).hexdigest()
    return int(h[:15], 16)


@dataclass
class Batch:
    """What a method returns for a list of items."""

    latents: Tensor | None  # (B, C, h, w), decoded by the driver unless `images` is given
    images: Tensor | None = None  # (B, C, R, R) in [-1, 1]
    mode_ids: list[int | None] | None = None
    extra: list[dict] | None = None  # per-item manifest fields


class Context:
    """Everything a method may use: backend, real data, classes, sampler, encodings."""

    def __init__(self, backend: "Backend | None", data, classes: list[ClassInfo], ipc: int, seed: int,
                 sampler: SamplerConfig, *, encode_batch_size: int = 64, encode_workers: int | None = None,
                 cache_dir=None, use_cache: bool = True, progress: bool = True,
                 max_real_per_class: int | None = None, method: str | None = None,
                 recommendation: "Recommendation | None" = None):
        self.backend, self.data, self.classes = backend, data, classes
        # every class of the run; `classes` is this process's share when several run (torchrun)
        self.all_classes = list(classes)
        if backend is not None:  # what the user left unset: the model's mgd3.json, read here unless given
            if recommendation is None:  # (`distill` gives the one its run spec read)
                recommendation = backend.defaults_at(ipc, method)
            sampler = resolve_sampler(sampler, recommendation)
        self.ipc, self.seed, self.sampler = ipc, seed, sampler
        self.encode_batch_size, self.cache_dir, self.progress = encode_batch_size, cache_dir, progress
        self.use_cache = use_cache  # False: encodings are computed again and not written
        self.encode_workers = encode_workers  # DataLoader workers for encoding; None: 0 on CPU, else up to 16
        # no model (a method that needs none, `Method.needs`): no plan and no CFG scale
        self.plan = Plan.from_betas(backend.betas, sampler.steps) if backend is not None else None
        # --cfg, else the model's recommendation for this IPC and method (mgd3.json), else DiT-XL/2's 4.0
        self.cfg_scale = sampler.cfg
        self.cfg_interval = sampler.cfg_interval
        self.max_real_per_class = max_real_per_class
        self._latents = None  # a CachedLatents of `classes` once encoded
        self.observers: list = []  # step observers (progress), set by the driver
        self.run_dir = None  # a folder for a method's own resume state (dm), set by the driver; None: no resume

    def real_indices(self, c: int) -> np.ndarray:
        """The real items of class c that modes are found from (see `mgd3.core.encode.real_subset`)."""
        from mgd3.core.encode import real_subset

        return real_subset(self.data, c, self.max_real_per_class)

    def real_latents(self) -> Mapping[int, Tensor]:
        """{class index: (N_c, C, h, w) float32} latents of the real train images of this process's
        classes (see `mgd3.core.encode.real_latents`): per-class work (k-means) never holds more than
        one class."""
        from mgd3.core.encode import real_latents

        wanted = [c.index for c in self.classes]
        if self._latents is None or list(self._latents) != wanted:
            self._latents = real_latents(self.backend, self.data, wanted, max_per_class=self.max_real_per_class,
                                         batch_size=self.encode_batch_size, workers=self.encode_workers,
                                         cache_dir=self.cache_dir, use_cache=self.use_cache,
                                         progress=self.progress)
        return self._latents

    def check_class_sizes(self) -> None:
        """Methods that pick or cluster real images need IPC <= every class size."""
        for c in self.classes:
            n = len(self.data.indices(c.index))
            if n < self.ipc:
                raise Mgd3Error(f"IPC {self.ipc} is larger than class {c.class_id!r} ({n} images)")

    def latents_of(self, images: Tensor) -> Tensor | None:
        """(B, C, R, R) images in [-1, 1] -> their latents through the model's VAE (what latents.pt
        holds for methods that make images), or None when the run has no model."""
        return self.backend.encode(images).cpu() if self.backend is not None else None

    def generators(self, items: Sequence[Item]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(it.seed) for it in items]

    def denoiser(self, wrap=None):
        b = self.backend
        inner = wrap(b.denoiser) if wrap else b.denoiser
        return CFGDenoiser(inner, self.cfg_scale, b.uncond(), self.sampler.cfg_channels, self.cfg_interval,
                           noise_levels(b.betas) if self.cfg_interval is not None else None)

    def sample(self, items: Sequence[Item], guidance: Sequence[Guidance] = (), *,
               x0: Tensor | None = None, start_index: int | None = None,
               generators: list[torch.Generator] | None = None, wrap=None) -> Tensor:
        """Sample latents for `items` (class-conditional). With `x0` and `start_index`, start
        from x0 noised to that step (img2img); otherwise from pure noise at the last step.
        `wrap` turns the backend's denoiser into a wrapped one (inside CFG)."""
        gens = generators or self.generators(items)
        shape = tuple(self.backend.latent_shape)
        dev = self.backend.device
        noise = randn_per_item(gens, shape, dev)  # (B, C, h, w) first draw of every generator
        if x0 is None:
            x = noise
        elif start_index < 0:  # nothing left to denoise (img2img strength 0)
            return x0.to(dev)
        else:
            x = self.plan.q_sample(x0.to(dev), start_index, noise)
        cond = self.backend.cond([it.cls.label for it in items])
        return sample(self.denoiser(wrap), x, self.plan, cond, gens, sampler=self.sampler.sampler,
                      eta=self.sampler.eta, guidance=guidance, observers=self.observers,
                      start_index=start_index)


class Method:
    """Base class: override `generate` (and `prepare` for per-run work such as mode discovery)."""

    name: ClassVar[str] = ""
    generative: ClassVar[bool] = True  # uses the diffusion sampler
    # what the method needs of a model: "sampler" (a diffusion model to sample), "vae" (its VAE's
    # encodings of the real data) or "nothing" (it makes images without a model; given one, its VAE
    # encodes them for latents.pt). With "nothing", a run without --model on data mgd3 ships no
    # model for loads none.
    needs: ClassVar[str] = "sampler"
    Options: ClassVar[type] = None  # a dataclass of options, or None
    # True when an image depends on the images of its class generated before it (then the batch
    # size is part of a run's resume key, and a resumed class is replayed in order)
    order_dependent: ClassVar[bool] = False
    # True when the method keeps work in the cache that a run must not lose (IGD's surrogate):
    # then `--no-cache` is refused before anything loads
    needs_cache: ClassVar[bool] = False

    def __init__(self, options=None):
        self.options = options

    @classmethod
    def resolve_options(cls, options, sampler: SamplerConfig):
        """`options` with every default that depends on the run's resolved sampler filled in (e.g.
        a stop index from the steps); called once, by `mgd3.run.spec.resolve_run`. Returns new
        options, never changes the given ones."""
        return options

    def validate(self, ctx: Context) -> None:
        """Raise Mgd3Error on options that do not fit the context (the options are resolved)."""

    def prepare(self, ctx: Context) -> None:
        """Per-run work before generation (e.g. encoding real data, mode discovery)."""

    def generate(self, ctx: Context, items: Sequence[Item]) -> Batch:
        raise NotImplementedError

    def replay(self, ctx: Context, items: Sequence[Item], latents: Tensor) -> None:
        """A resumed run hands over a batch an interrupted run generated (in generation order),
        so that state built from earlier batches is as if this run had made it."""

    def manifest_info(self) -> dict:
        """Method-specific facts for the manifest (e.g. how modes were chosen)."""
        return {}


METHODS: Registry[type[Method]] = Registry("method")
_loaded = False


def load_methods() -> Registry[type[Method]]:
    global _loaded
    if not _loaded:
        for mod in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{mod.name}")
        _loaded = True
    return METHODS


def get_method(name: str) -> type[Method]:
    return load_methods().get(name)


def option_names(method_cls: type[Method]) -> dict[str, str]:
    """Every name an option of the method goes by -> its field name: the documented name (the CLI
    flag without "--": `lambda`, `t-stop`), the same with "_" for "-" (`t_stop`, as in a YAML
    file or a Python call), the field name (`lam`) and the flag itself (`--t-stop`)."""
    names: dict[str, str] = {}
    for f in dataclasses.fields(method_cls.Options) if method_cls.Options else ():
        doc = option_flag(f)[2:]
        for n in (doc, doc.replace("-", "_"), f.name, option_flag(f)):
            names.setdefault(n, f.name)
    return names


def documented_options(method_cls: type[Method]) -> list[str]:
    """The method's option names as a Python call or a YAML file takes them (the CLI flags without
    "--", "_" for "-": `lambda`, `t_stop`)."""
    return [option_flag(f)[2:].replace("-", "_") for f in dataclasses.fields(method_cls.Options)] \
        if method_cls.Options else []


def describe_options(method_cls: type[Method]) -> str:
    """'--lambda, --t-stop (in Python and YAML: lambda, t_stop)', or 'none'."""
    if not method_cls.Options:
        return "none"
    flags = ", ".join(option_flag(f) for f in dataclasses.fields(method_cls.Options))
    return f"{flags} (in Python and YAML: {', '.join(documented_options(method_cls))})"


def _shown(name: str) -> str:
    """How an option name a method does not take is shown: as a flag when some method has it."""
    for other in load_methods().names():
        field_names = option_names(METHODS.get(other))
        if name in field_names:
            f = next(f for f in dataclasses.fields(METHODS.get(other).Options) if f.name == field_names[name])
            return option_flag(f)
    return repr(name)


def options_by_field(method_cls: type[Method], given: Mapping[str, Any], source: str = "") -> dict[str, Any]:
    """`given` (keyed by any name of `option_names`) keyed by field name; a name the method does
    not take, or one option given twice, is an error that lists the names it takes."""
    names = option_names(method_cls)
    out: dict[str, Any] = {}
    where = f"{source} " if source else ""
    if given and not names:
        shown = ", ".join(sorted(_shown(str(k)) for k in given))
        raise Mgd3Error(f"{where}method {method_cls.name!r} takes no option {shown}")
    unknown = sorted(str(k) for k in given if str(k) not in names)
    if unknown:
        raise Mgd3Error(f"{where}method {method_cls.name!r} does not take {', '.join(_shown(u) for u in unknown)}; "
                        f"its options: {describe_options(method_cls)}")
    for k, v in given.items():
        name = names[str(k)]
        if name in out:
            raise Mgd3Error(f"{where}method {method_cls.name!r}: option {k!r} is given twice (as {name!r} too)")
        out[name] = v
    return out


def method_options(method_cls: type[Method], given: Mapping[str, Any]):
    """The method's options dataclass from `given` (see `options_by_field`), or None when the
    method takes no options."""
    fields = options_by_field(method_cls, given)
    return method_cls.Options(**fields) if method_cls.Options is not None else None


def recommended_options(backend: "Backend", method_cls: type[Method],
                        recommendation: "Recommendation") -> dict[str, Any]:
    """The model's recommended options for this method, by field name, from its mgd3.json at the
    run's IPC (`recommendation`, `Backend.defaults_at`):
    {"defaults": {"methods": {"mgd3": {"lambda": 0.3}}, "by_ipc": [{"ipc": [5, 20], "methods": ...}]}}
    (keys are documented names, e.g. `t-stop` or `t_stop`, as in a --config file)."""
    rec = dict((recommendation.settings.get("methods") or {}).get(method_cls.name) or {})
    for key in SAMPLER_RECOMMENDATIONS:  # a method's recommended CFG scale or steps are sampler settings
        rec.pop(key, None)  # (Backend.defaults_at)
    if not rec:
        return {}
    if not isinstance(rec, dict):
        raise Mgd3Error(f"{backend.path}/mgd3.json recommends {rec!r} for method {method_cls.name!r}; "
                        "it must be a mapping of option: value")
    names = option_names(method_cls)
    unknown = sorted(str(k) for k in rec if str(k) not in names)
    if unknown:
        raise Mgd3Error(f"{backend.path}/mgd3.json recommends {', '.join(unknown)} for method "
                        f"{method_cls.name!r}, which it does not take")
    return check_method_options(options_by_field(method_cls, rec), f"{backend.path}/mgd3.json")


def check_finite(name: str, value: float, minimum: float = 0.0) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value < minimum:
        raise Mgd3Error(f"{name} must be a finite number >= {minimum:g}, got {value}")


def check_at_least(*checks: tuple[str, int, int]) -> None:
    """(flag, value, minimum) for each count option: the first below its minimum is an error."""
    for name, value, minimum in checks:
        if value < minimum:
            raise Mgd3Error(f"{name} must be at least {minimum}, got {value}")


def class_modes_progress(ctx: Context, desc: str):
    return tqdm(ctx.classes, desc=desc, unit="class", disable=not ctx.progress, leave=False)


def as_tensor_modes(arr: np.ndarray, shape) -> Tensor:
    return torch.from_numpy(np.asarray(arr, dtype=np.float32)).reshape(-1, *shape)


# --- option checks (types, ranges, choices), the same for flags, YAML, the API and mgd3.json


def method_option_fields() -> dict[str, dataclasses.Field]:
    """Every registered method's option fields by name (the first method's, when shared)."""
    reg = load_methods()
    out: dict[str, dataclasses.Field] = {}
    for name in reg.names():
        opts = reg.get(name).Options
        for f in dataclasses.fields(opts) if opts else ():
            out.setdefault(f.name, f)
    return out


def option_choices(f: dataclasses.Field) -> list[str] | None:
    """The choices of an enumerated method option (its own, or a registry's for --modes)."""
    if f.metadata.get("choices"):
        return list(f.metadata["choices"])
    if f.name == "modes":
        from mgd3.core.mode_discovery import MODE_FINDERS

        return list(MODE_FINDERS.names())
    return None


def check_method_options(options: dict, source: str = "") -> dict:
    """Types, finiteness, seed ranges and choices of method options (by field name); returns
    them converted. What fits one method only (t_stop against the steps) is the method's check."""
    fields = method_option_fields()
    out = {}
    for k, v in options.items():
        f = fields.get(k)
        if f is None:  # the method names what it does not take
            out[k] = v
            continue
        name = option_flag(f)
        v = convert(name if not source else name.lstrip("-"), v, f.type, source)
        choices = option_choices(f)
        if choices is not None:
            Rule(choices=tuple(choices), what="mode finder" if k == "modes" else None).check(name, v)
        elif k.endswith("seed"):
            Rule(minimum=0, maximum=RANDOM_STATE_MAX).check(name, v)
        elif isinstance(v, int) and not isinstance(v, bool):  # step indices, counts: what a run can use
            Rule(minimum=-1, maximum=1_000_000).check(name, v)
        elif isinstance(v, float):
            Rule(minimum=0.0).check(name, v)
        out[k] = v
    return out


def check_recommendations(backend: "Backend") -> None:
    """The method options a model's mgd3.json recommends (folder-wide and in every "by_ipc" entry),
    checked as the CLI checks them, for every method; done once the model is loaded, before any data
    loads (`recommended_options` converts them again when a method takes them)."""
    defaults = getattr(backend, "defaults", None) or {}
    source = f"{backend.path}/mgd3.json"
    fields = method_option_fields()
    by_flag = {option_flag(f).lstrip("-"): name for name, f in fields.items()}
    for entry in [defaults, *(defaults.get("by_ipc") or [])]:
        for opts in (entry.get("methods") or {}).values():
            for k, v in opts.items():
                if k in SAMPLER_RECOMMENDATIONS:
                    continue
                name = by_flag.get(str(k).replace("_", "-"), str(k))
                if name in fields:
                    check_method_options({name: v}, source)
