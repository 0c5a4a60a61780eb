"""The sampling loop does not fault its memory in again every step (allocator.py), and the fix
changes no latent."""

import subprocess
import sys

import pytest

SCRIPT = r"""
import hashlib, resource, sys
import torch
if sys.argv[1] == "fixed":
    from mgd3.allocator import keep_freed_memory
    assert keep_freed_memory()
from mgd3.backends import load_backend
from mgd3.io.data import load_data
from mgd3.run.driver import shipped_model
from mgd3.methods import ClassInfo, Context, Item, SamplerConfig, item_seed

torch.set_num_threads(1)
b = load_backend(shipped_model("fashion-mnist"))
d = load_data("fashion-mnist", "train", resolution=28, channels=1)
cls = ClassInfo(0, d.class_ids[0], d.class_names[0], 0)
ctx = Context(b, d, [cls], 10, 0, SamplerConfig(steps=3), progress=False)
items = [Item(cls, k, item_seed(0, cls.class_id, k)) for k in range(10)]
ctx.sample(items)  # warm-up at the measured batch: the heap has grown to what the loop needs
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = ctx.sample(items)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults, hashlib.sha256(x.numpy().tobytes()).hexdigest())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_fixed_thresholds_stop_the_page_fault_churn_and_change_no_latent():
    out = {}
    for mode in ("default", "fixed"):
        r = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        faults, digest = r.stdout.split()
        out[mode] = (int(faults), digest)
    assert out["fixed"][1] == out["default"][1]  # the same latents, bit for bit
    # 10 images x 3 steps with CFG after a warm-up at that batch: about no fault with the fixed
    # thresholds. Whether glibc's default churns (tens of thousands of faults) depends on its
    # dynamic mmap threshold, which the process's earlier allocations move (a large file read
    # raises it), so the default count is not asserted.
    assert out["fixed"][0] < 300, out


def test_user_settings_win(monkeypatch):
    import mgd3.allocator as a

    monkeypatch.setattr(a, "_applied", None)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert a.keep_freed_memory() is False
