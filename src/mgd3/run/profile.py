"""Stage profile of a `distill` run: per stage (load, prepare, generate, decode_write) the work
done — images, model forwards, estimated FLOPs — and the rate achieved, so a slow change can be
told from a slow machine.

FLOPs count the matrix products (linear layers, convolutions, attention) at 2 per
multiply-add, as `torch.utils.flop_counter.FlopCounterMode` does; element-wise work (norms,
activations, the sampler's own arithmetic) is not counted. A DiT forward is estimated from its
config (`dit_forward_flops`); every other network (VAE encoder and decoder, a UNet) is counted
once with `FlopCounterMode` on its first call of the run, per batch row.

`StageProfile.observe(backend)` returns the profile and an `ObservedBackend`: a view of the
backend whose `encode`, `decode` and `denoiser` book each call to the current stage (the same
calls, the same results) while the backend itself is left as it was (a model loaded once with
`mgd3.load_model` serves many runs, each with its own view); the driver calls `enter(stage)` as it moves on, then `finish(timing)` turns the
counts and the stage seconds into the manifest's `profile` and `line()` into the one log line.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

STAGES = ("load", "prepare", "generate", "decode_write")


def dit_forward_flops(config, batch: int = 1) -> float:
    """Matmul FLOPs of one diffusers `DiTTransformer2DModel` forward (ada_norm_zero blocks,
    self-attention only) on `batch` latents, from its config: patch embedding; per block the
    timestep embedder (256 -> d -> d), the adaLN-zero projection (d -> 6d), q/k/v and output
    projections, attention (QKᵀ and AV: 4·T²·d) and the 4d feed-forward; the final conditioning
    (embedder again, d -> 2d) and the unpatchify projection. d = heads × head dim, T = tokens."""
    get = config.get if isinstance(config, dict) else lambda k, default=None: getattr(config, k, default)
    d = int(get("num_attention_heads")) * int(get("attention_head_dim"))
    p = int(get("patch_size") or 1)
    size = int(get("sample_size"))
    c_in = int(get("in_channels"))
    c_out = int(get("out_channels") or c_in)
    layers = int(get("num_layers"))
    tokens = (size // p) ** 2
    t_dim = 256  # diffusers' sinusoidal timestep projection width (Timesteps(256))
    embed = 2 * (t_dim * d + d * d)  # TimestepEmbedding: linear_1, linear_2 (per image)
    block = (embed
             + 2 * d * 6 * d  # adaLN-zero modulation
             + tokens * 2 * d * d * 4  # q, k, v, out projections
             + 4 * tokens * tokens * d  # QKᵀ and AV
             + tokens * 2 * d * 4 * d * 2)  # feed-forward d -> 4d -> d
    head = embed + 2 * d * 2 * d + tokens * 2 * d * p * p * c_out
    patch = tokens * 2 * (c_in * p * p) * d
    return float(batch * (patch + layers * block + head))


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn, *args, **kwargs):
    """(fn(*args, **kwargs), matmul FLOPs it ran) under `FlopCounterMode`, which also counts
    the CPU kernel of `scaled_dot_product_attention` here (torch's counter knows only the GPU
    ones). The call runs as it would without the counter: same kernels, same results."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _cpu_attention_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        result = fn(*args, **kwargs)
    return result, float(counter.get_total_flops())


@dataclass
class _Work:
    images: int = 0  # images read, encoded, decoded or generated
    forwards: int = 0  # network forwards, counted per batch row (a CFG pair is 2)
    flops: float = 0.0
    model_s: float = 0.0  # seconds inside the network calls
    calls: dict = field(default_factory=dict)  # "encode"/"decode"/"denoiser" -> rows
    usage: list = field(default_factory=lambda: [0.0, 0.0, 0])  # CPU user s, CPU system s, minor faults


class StageProfile:
    """Counts the network work of a run per stage; see the module docstring."""

    def __init__(self):
        self.stage = "load"
        self.work = {s: _Work() for s in STAGES}
        self._usage = _rusage()
        self.per_row: dict[str, float] = {}  # FLOPs per batch row of each network

    @classmethod
    def observe(cls, backend) -> tuple["StageProfile", "ObservedBackend"]:
        """A new profile and the view of `backend` that books its work (the backend is unchanged)."""
        prof = cls()
        if getattr(backend, "name", None) == "dit" and hasattr(backend, "transformer"):
            prof.per_row["denoiser"] = dit_forward_flops(backend.transformer.config)
        return prof, ObservedBackend(backend, prof)

    def _wrap(self, name: str, inner):
        def call(x, *args, **kwargs):
            rows = int(x.shape[0])
            t = time.perf_counter()
            if name not in self.per_row and rows > 0:  # first call: count this network once
                out, flops = count_flops(inner, x, *args, **kwargs)
                self.per_row[name] = flops / rows
            else:
                out = inner(x, *args, **kwargs)
            w = self.work[self.stage]
            w.model_s += time.perf_counter() - t
            w.calls[name] = w.calls.get(name, 0) + rows
            w.flops += rows * (self.per_row.get(name) or 0.0)
            w.forwards += rows
            if name == "encode":
                w.images += rows
            return out

        call.__wrapped__ = inner
        return call

    def enter(self, stage: str, images: int = 0) -> None:
        """Book what follows to `stage`; `images`: images that stage makes (generated, written)."""
        self._book_usage()
        self.stage = stage
        self.work[stage].images += int(images)

    def _book_usage(self) -> None:
        now = _rusage()
        u = self.work[self.stage].usage
        for i in range(3):
            u[i] += now[i] - self._usage[i]
        self._usage = now

    def finish(self, timing: dict) -> dict:
        """The summary for the manifest (`summary`); logs its one line."""
        self._book_usage()
        summary = self.summary(timing)
        log.info("profile: %s", self.line(summary))
        return summary

    def summary(self, timing: dict) -> dict:
        """{stage: {seconds, images, forwards, calls, flops, gflop_per_s, model_s,
        model_gflop_per_s, cpu_user_s, cpu_system_s, minor_faults}} for the manifest. `seconds`
        is the stage's wall time from the driver's `timing`; `images` are those encoded (prepare)
        or generated (generate, decode_write); `forwards` are network batch rows; `model_s` the
        seconds inside the network calls (on a GPU, without a synchronisation: launch time for
        calls that do not wait for their results). The CPU seconds and page faults are the
        process's (every thread) between the driver's `enter` calls: load counts from the
        backend's load on, decode_write up to the manifest."""
        out = {}
        for s in STAGES:
            w = self.work[s]
            sec = float(timing.get(s, 0.0) or 0.0)
            out[s] = {
                "seconds": round(sec, 3),
                "images": int(w.images),
                "forwards": int(w.forwards),
                "calls": dict(w.calls),
                "flops": float(f"{w.flops:.4g}"),
                "gflop_per_s": round(w.flops / sec / 1e9, 2) if sec > 0 else 0.0,
                "model_s": round(w.model_s, 3),
                "model_gflop_per_s": round(w.flops / w.model_s / 1e9, 2) if w.model_s > 0 else 0.0,
                # this process, every thread: where CPU time goes (user vs kernel) and page faults
                "cpu_user_s": round(w.usage[0], 3), "cpu_system_s": round(w.usage[1], 3),
                "minor_faults": int(w.usage[2]),
            }
        out["flops_per_row"] = {k: float(f"{v:.4g}") for k, v in self.per_row.items() if v is not None}
        return out

    @staticmethod
    def line(summary: dict) -> str:
        """One line: each stage that did network work, e.g. `generate: 10 000 forwards,
        2.7 TFLOP, 75 GFLOP/s`."""
        parts = []
        for s in STAGES:
            st = summary.get(s)
            if not st:
                continue
            if st["flops"] <= 0:
                parts.append(f"{s}: {st['seconds']:.1f} s")
                continue
            what = (f"{_n(st['forwards'])} forwards" if s == "generate"
                    else f"{_n(st['forwards'])} VAE {'encodings' if s == 'prepare' else 'decodings'}")
            parts.append(f"{s}: {what}, {_flop(st['flops'])}, {st['seconds']:.1f} s, "
                         f"{_flop(st['gflop_per_s'] * 1e9)}/s")
        return "; ".join(parts)


def _rusage() -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of this process so far; zeros where unknown."""
    try:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime, r.ru_stime, r.ru_minflt
    except (ImportError, OSError):
        return 0.0, 0.0, 0


def _n(n: int) -> str:
    return f"{n:,}".replace(",", " ")


def _flop(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP"


def matmul_peak(n: int = 2048, repeats: int = 5, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> float:
    """The best FLOP/s of a timed n×n×n `torch.mm` in this process (one warm-up call first): the
    practical compute limit the stage rates are compared with."""
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


class ObservedBackend:
    """A backend as one run sees it: `encode`, `decode` and `denoiser` counted by the run's
    `StageProfile`, every other attribute the backend's own (read and written through)."""

    _OBSERVED = ("encode", "decode", "denoiser")

    def __init__(self, backend, prof: StageProfile):
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_calls", {n: prof._wrap(n, getattr(backend, n)) for n in self._OBSERVED
                                            if callable(getattr(backend, n, None))})

    @property
    def unwrapped(self):
        """The backend itself."""
        return self._backend

    def __getattr__(self, name: str):
        calls = object.__getattribute__(self, "_calls")
        if name in calls:
            return calls[name]
        return getattr(object.__getattribute__(self, "_backend"), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._backend, name, value)

    def __repr__(self) -> str:
        return f"ObservedBackend({self._backend!r})"
