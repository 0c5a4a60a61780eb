"""Stage profile: the DiT FLOP estimate equals a FLOP counter, the counts in the manifest are the
work the run did, and attaching the profile changes no result."""

import json
import logging

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mgd3.backends import load_backend
from mgd3.run.driver import distill
from mgd3.run.settings import DistillConfig
from mgd3.methods import SamplerConfig
from mgd3.run.profile import StageProfile, count_flops, dit_forward_flops, matmul_peak


@pytest.mark.parametrize("patch,sigma,size,layers", [(1, True, 7, 2), (2, False, 8, 3), (2, True, 32, 1)])
def test_dit_flops_from_config_equal_the_flop_counter(patch, sigma, size, layers):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=8, in_channels=4,
                                  out_channels=8 if sigma else 4, num_layers=layers, sample_size=size,
                                  patch_size=patch, num_embeds_ada_norm=10).eval()
    b = 3
    x = torch.randn(b, 4, size, size)
    t, y = torch.tensor([5, 50, 500]), torch.tensor([0, 1, 10])
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, timestep=t, class_labels=y)  # attention as explicit matmuls, which the counter sees
    assert dit_forward_flops(model.config, batch=b) == counter.get_total_flops()
    assert dit_forward_flops(dict(model.config), batch=b) == counter.get_total_flops()
    with torch.no_grad():  # the CPU attention kernel, counted by count_flops
        assert count_flops(model, x, timestep=t, class_labels=y)[1] == counter.get_total_flops()


def test_observed_backend_changes_no_result_and_counts_rows(digits_model):
    plain = load_backend(digits_model)
    profiled = load_backend(digits_model)
    backend = profiled
    prof, profiled = StageProfile.observe(backend)
    assert not {"encode", "decode", "denoiser"} & set(vars(backend))  # observed, not patched
    assert profiled.unwrapped is backend and profiled.latent_shape == backend.latent_shape
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    prof.enter("prepare")
    assert torch.equal(plain.encode(x), profiled.encode(x))  # the counted first call
    assert torch.equal(plain.encode(x[:2]), profiled.encode(x[:2]))
    z = plain.encode(x)
    prof.enter("generate", images=5)
    t = torch.full((5,), 10)
    y = torch.arange(5)
    assert torch.equal(plain.denoiser(z, t, y).eps, profiled.denoiser(z, t, y).eps)
    w = prof.work
    assert w["prepare"].images == 7 and w["prepare"].calls == {"encode": 7}
    assert w["generate"].forwards == 5 and w["generate"].images == 5
    _, enc_flops = count_flops(plain.encode, x)
    assert prof.per_row["encode"] == pytest.approx(enc_flops / 5)
    assert w["prepare"].flops == pytest.approx(7 * enc_flops / 5)
    assert w["generate"].flops == pytest.approx(5 * dit_forward_flops(plain.transformer.config))


def test_manifest_profile_is_the_work_of_the_run(digits_model, tmp_path, caplog):
    out = tmp_path / "o"
    steps, ipc = 3, 2
    with caplog.at_level(logging.INFO, logger="mgd3"):
        distill(DistillConfig(data="digits", model=str(digits_model), out=str(out), ipc=ipc, progress=False,
                              classes=["0", "1", "2"], sampler=SamplerConfig(steps=steps)))
    m = json.loads((out / "manifest.json").read_text())
    p = m["profile"]
    gen = p["generate"]
    assert gen["images"] == 3 * ipc
    assert gen["forwards"] == 3 * ipc * steps * 2  # CFG: conditional and unconditional rows
    backend = load_backend(digits_model)
    assert gen["flops"] == pytest.approx(gen["forwards"] * dit_forward_flops(backend.transformer.config), rel=1e-3)
    assert gen["seconds"] == m["timing_s"]["generate"]
    from mgd3.io.data import load_data

    data = load_data("digits", classes=["0", "1", "2"], resolution=8, channels=1)
    n_real = len(data)
    assert p["prepare"]["images"] == n_real and p["prepare"]["calls"] == {"encode": n_real}
    assert p["decode_write"]["images"] == 3 * ipc and p["decode_write"]["calls"] == {"decode": 3 * ipc}
    assert p["load"]["flops"] == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("profile: ")]
    assert len(lines) == 1
    assert f"generate: {gen['forwards']} forwards" in lines[0] and "FLOP/s" in lines[0]

    # a second run finds the encodings in the cache: nothing encoded, and the line says so
    out2 = tmp_path / "o2"
    distill(DistillConfig(data="digits", model=str(digits_model), out=str(out2), ipc=ipc, progress=False,
                          classes=["0", "1", "2"], sampler=SamplerConfig(steps=steps)))
    p2 = json.loads((out2 / "manifest.json").read_text())["profile"]
    assert p2["prepare"]["images"] == 0 and p2["prepare"]["flops"] == 0


def test_line_and_peak():
    s = {"load": {"seconds": 1.23, "flops": 0.0},
         "generate": {"seconds": 36.0, "flops": 2.7e12, "forwards": 10000, "gflop_per_s": 75.0}}
    assert StageProfile.line(s) == "load: 1.2 s; generate: 10 000 forwards, 2.7 TFLOP, 36.0 s, 75 GFLOP/s"
    assert matmul_peak(n=128, repeats=2) > 0


def _stages(generate_gflops: float, seconds: float = 30.0) -> dict:
    return {"load": {"seconds": 2.0, "flops": 0.0, "gflop_per_s": 0.0},
            "generate": {"seconds": seconds, "flops": generate_gflops * 1e9 * seconds, "gflop_per_s": generate_gflops}}


def test_busy_note_needs_a_slow_long_stage_and_a_busy_cpu():
    from mgd3.run.profile import busy_note

    peak = 186e9  # benchmarks/results/stage_profile.md: 2 threads, generate at 104 GFLOP/s when quiet
    note = busy_note(_stages(9.65), peak, 40e9, 7.2, 2, 2)  # the run: 9.65 GFLOP/s under load
    assert note.startswith("the CPU looks busy: generate ran at 9.65 GFLOP/s, 5 % of") and "--threads 1" in note
    assert "186 GFLOP/s" in note and "40 now" in note and "load average 7.2 on 2 cores" in note
    assert busy_note(_stages(104.0), peak, 40e9, 7.2, 2, 2) is None  # the usual rate: nothing to say
    assert busy_note(_stages(9.65), peak, 180e9, 1.0, 2, 2) is None  # slow on a quiet CPU (tiny batches)
    assert busy_note(_stages(9.65, seconds=2.0), peak, 40e9, 7.2, 2, 2) is None  # too short to judge
    assert busy_note(_stages(9.65), peak, 180e9, 4.0, 2, 2) is not None  # a full matmul, but twice the load
    assert "load average" not in busy_note(_stages(9.65), peak, 40e9, None, 2, 2)


def test_best_peak_is_cached_per_cpu_and_threads(tmp_path):
    from mgd3.run.profile import PEAK_FILE, best_peak

    assert best_peak(100e9, 2, tmp_path) == 100e9
    assert best_peak(50e9, 2, tmp_path) == 100e9  # a busy moment keeps the best
    assert best_peak(30e9, 1, tmp_path) == 30e9  # another thread count: its own entry
    assert best_peak(120e9, 2, tmp_path) == 120e9
    seen = json.loads((tmp_path / PEAK_FILE).read_text())
    assert sorted(seen.values()) == [30e9, 120e9]
    (tmp_path / PEAK_FILE).write_text("[not json")
    assert best_peak(10e9, 2, tmp_path) == 10e9  # a broken cache is started again


def test_a_busy_run_logs_one_warning(monkeypatch, caplog):
    import mgd3.run.profile as prof

    monkeypatch.setattr(prof, "matmul_peak", lambda *a, **k: 40e9)
    monkeypatch.setattr(prof, "best_peak", lambda now, threads, cache=None: 186e9)
    with caplog.at_level(logging.WARNING, logger="mgd3"):
        prof.warn_if_busy(_stages(9.65))
        prof.warn_if_busy(_stages(9.65, seconds=1.0))  # short: no measurement, no warning
    assert [r.getMessage()[:20] for r in caplog.records] == ["the CPU looks busy: "]


def test_distill_threads_are_used_and_restored(digits_model, tmp_path, capsys):
    from clitools import refused
    from conftest import run_cli

    before = torch.get_num_threads()
    out = tmp_path / "o"
    r = run_cli("distill", "--data", "digits", "--model", digits_model, "--classes", "0", "1", "--ipc", "1",
                "--steps", "2", "--threads", before + 1, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["machine"]["threads"] == before + 1 and m["config"]["threads"] == before + 1
    distill(DistillConfig(data="digits", model=str(digits_model), out=str(tmp_path / "api"), ipc=1, progress=False,
                          classes=["0", "1"], threads=before + 1, sampler=SamplerConfig(steps=2)))
    assert torch.get_num_threads() == before  # the caller's setting comes back
    refused(capsys, ["distill", "--data", "digits", "--model", digits_model, "--threads", "0", "--out",
                     tmp_path / "bad"], "threads")
