"""The ImageNet-1K soft-label recipe end to end: sharded distillation (DiT-XL/2, MGD³, IPC 10 and
50) -> sharded evaluation under the protocol the MGD³ paper reports for ImageNet-1K (ResNet-18
student, soft labels from a ResNet-18 teacher, RDED's training; see docs/SCALE.md,
"ImageNet-1K soft-label recipe"), and its cost per stage on 1 / 8 / 16 GPUs from FLOP counts.

    # the commands for 2 nodes x 8 GPUs (run the printed lines on every node, NODE_RANK 0 and 1)
    .venv/bin/python benchmarks/imagenet1k_recipe.py --nodes 2 --gpus-per-node 8 \\
        --rdzv-endpoint node0:29500 --data-root /data/imagenet --class-map wnids.txt
    # run them on this node (node rank 0 of the launch)
    .venv/bin/python benchmarks/imagenet1k_recipe.py --run --node-rank 0 ...
    # the per-stage cost table (FLOP counts; GPU times are estimates) -> benchmarks/results/imagenet1k_recipe.md
    .venv/bin/python benchmarks/imagenet1k_recipe.py --costs
    # the whole recipe on the tiny test models, 3 digits classes, 2 CPU processes (a test: tests/test_recipe.py)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/imagenet1k_recipe.py --dry-run --work /tmp/recipe

The dry run runs the same command lines the real recipe prints, with the ImageNet-sized values
swapped for tiny ones (`DRY`): the tiny DiT the tests build, digits classes 0 1 2, IPC 1 and 2,
4 sampling steps, 1 teacher epoch and 2 student epochs, `torchrun --nproc-per-node 2` on the
CPU. Its IPC-1 evaluation is one DDP training over both processes, its IPC-2 evaluation trains
the seeds over the processes, so both modes run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- the recipe

IPCS = (10, 50)
SEEDS = (0, 1, 2)
DISTILL = ["--method", "mgd3", "--model", "facebook/DiT-XL-2-256", "--cfg", "4.0", "--steps", "50",
           "--device", "cuda", "--precision", "bf16", "--batch-size", "128", "--seed", "0", "--quiet"]
EVALUATE = ["--protocol", "soft", "--arch", "resnet-18", "--device", "cuda", "--bf16", "--quiet"]

# the tiny stand-ins of the dry run
DRY = {"ipc": {10: 1, 50: 2}, "classes": ["0", "1", "2"], "steps": "4", "batch": "2", "teacher_epochs": "1",
       "epochs": "2", "seeds": ("0", "1"), "dist_mode": {10: "ddp", 50: "seeds"}}


def launcher(nproc: int, nodes: int, node_rank: int, rdzv: str | None, port: int | None = None) -> list[str]:
    """torchrun's arguments: one node (a free local port) or several (c10d rendezvous at `rdzv`)."""
    if nodes == 1:
        return ["--nnodes", "1", "--nproc-per-node", str(nproc), "--master-port", str(port or 29500)]
    return ["--nnodes", str(nodes), "--nproc-per-node", str(nproc), "--node-rank", str(node_rank),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv, "--rdzv-id", "mgd3-in1k"]


def commands(a, dry: bool = False, model: str | None = None) -> list[tuple[str, list[str]]]:
    """(stage, argv) of the recipe in order: distill IPC 10, evaluate it, distill IPC 50, evaluate it."""
    py = [sys.executable, "-m", "torch.distributed.run"]
    out = []
    for ipc in a.ipcs:
        run = Path(a.out) / f"in1k-mgd3-ipc{ipc}"
        launch = launcher(a.gpus_per_node, a.nodes, a.node_rank, a.rdzv_endpoint, getattr(a, "port", None))
        if dry:
            d_ipc = DRY["ipc"][ipc]
            distill = ["distill", "--data", "digits", "--classes", *DRY["classes"], "--out", run,
                       "--ipc", str(d_ipc), *DISTILL]
            distill = _swap(distill, {"--model": model, "--steps": DRY["steps"], "--device": "cpu",
                                      "--precision": "fp32", "--batch-size": DRY["batch"]})
            evaluate = ["evaluate", run, *EVALUATE, "--seeds", *DRY["seeds"], "--teacher-epochs",
                        DRY["teacher_epochs"], "--epochs", DRY["epochs"], "--threads", "1",
                        "--dist-mode", DRY["dist_mode"][ipc]]
            evaluate = _swap([x for x in evaluate if x != "--bf16"], {"--device": "cpu"})
        else:
            data = ["--data", a.data_root, "--class-map", a.class_map]
            distill = ["distill", *data, "--out", run, "--ipc", str(ipc), *DISTILL]
            evaluate = ["evaluate", run, *data, *EVALUATE, "--seeds", *map(str, SEEDS)]
        out.append((f"distill IPC {ipc}", [*py, *launch, "-m", "mgd3", *map(str, distill)]))
        out.append((f"evaluate IPC {ipc}", [*py, *launch, "-m", "mgd3", *map(str, evaluate)]))
    return out


def _swap(argv: list, values: dict) -> list:
    argv = list(argv)
    for flag, v in values.items():
        argv[argv.index(flag) + 1] = v
    return argv


def dry_run(a) -> int:
    """The whole recipe on the tiny models, 2 CPU processes; checks what every stage wrote."""
    from mgd3.testing import build_dit_folder

    t0 = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build_dit_folder(work / "dit-digits", num_classes=10, image_channels=1, resolution=8,
                             class_names=[str(i) for i in range(10)])
    a.out, a.nodes, a.gpus_per_node = str(work / "runs"), 1, 2
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               MGD3_CACHE_DIR=os.environ.get("MGD3_CACHE_DIR") or str(work / "cache"))
    for stage, argv in commands(a, dry=True, model=str(model)):
        a.port = _free_port()
        argv = _swap(argv, {"--master-port": str(a.port)})
        t = time.perf_counter()
        r = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{stage} failed ({r.returncode}):\n{r.stderr[-4000:]}", file=sys.stderr)
            return 1
        print(f"{stage}: {time.perf_counter() - t:.1f} s")
    for ipc in a.ipcs:
        run = work / "runs" / f"in1k-mgd3-ipc{ipc}"
        m = json.loads((run / "manifest.json").read_text())
        e = json.loads((run / "eval.json").read_text())
        n = DRY["ipc"][ipc] * len(DRY["classes"])
        assert len(m["images"]) == n and m["machine"]["processes"] == 2, m["machine"]
        assert e["set"]["num_images"] == n and e["arch"] == "resnet-18" and e["protocol"]["loss"] == "kl"
        assert e["distributed"]["world_size"] == 2 and e["distributed"]["mode"] == DRY["dist_mode"][ipc]
        print(f"IPC {ipc} (dry: {DRY['ipc'][ipc]}): {n} images, {e['mean']:.2f} ± {e['std']:.2f} % "
              f"({e['distributed']['mode']}; teacher {e['teacher']['test_acc']:.2f} %)")
    print(f"dry run: {time.perf_counter() - t0:.1f} s")
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- costs (estimates)

IN1K_TRAIN, IN1K_VAL, CLASSES = 1_281_167, 50_000, 1000
H100_BF16_PEAK = 989e12
DIT_UTIL = (0.30, 0.50)  # docs/SCALE.md's assumption for DiT-XL/2 and the VAE
CNN_UTIL = (0.05, 0.15)  # ResNet-18 training (instance norm, 224 px): small kernels, far from peak
STEP_OVERHEAD_S = {1: (0.0, 0.0), 8: (0.002, 0.004), 16: (0.004, 0.008)}  # per step: all-reduce + sync


def resnet18_flops(resolution: int = 224) -> float:
    """Forward FLOPs of mgd3's ResNet-18 (IDC's, instance norm) at `resolution`, 1000 classes."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scale_flops import count

    from mgd3.evaluation.networks import build_network

    with torch.device("meta"):
        net = build_network("resnet-18", 3, CLASSES, resolution)
    return count(lambda: net(torch.empty(1, 3, resolution, resolution, device="meta")))[0]


def dit_flops() -> tuple[float, float, float]:
    """DiT-XL/2 forward, SD VAE encode and decode at 256 px (FLOPs per image)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scale_flops import count, dit_xl2, sd_vae

    dit, vae = dit_xl2(), sd_vae()
    f_dit = count(lambda: dit(torch.empty(1, 4, 32, 32, device="meta"), timestep=torch.zeros(1, device="meta"),
                              class_labels=torch.zeros(1, dtype=torch.long, device="meta")))[0]
    f_enc = count(lambda: vae.encode(torch.empty(1, 3, 256, 256, device="meta")))[0]
    f_dec = count(lambda: vae.decode(torch.empty(1, 4, 32, 32, device="meta")))[0]
    return f_dit, f_enc, f_dec


def span(seconds: tuple[float, float]) -> str:
    lo, hi = sorted(seconds)

    def fmt(s: float) -> str:
        return f"{s / 3600:.1f} h" if s >= 5400 else (f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s")
    return f"{fmt(lo)}–{fmt(hi)}"


def costs() -> str:
    from mgd3.evaluation.protocols import get_protocol, rded_batch_size

    f_r18 = resnet18_flops()
    f_dit, f_enc, f_dec = dit_flops()
    soft = get_protocol("soft")
    lines = [
        "# ImageNet-1K soft-label recipe: cost per stage (FLOP counts; GPU times are estimates)",
        "",
        "No GPU has run this recipe: every time below is FLOPs / (assumed share of the H100 SXM bf16 peak, "
        f"{H100_BF16_PEAK / 1e12:.0f} TFLOP/s). DiT-XL/2 and the VAE: {DIT_UTIL[0]:.0%}–{DIT_UTIL[1]:.0%} "
        f"(docs/SCALE.md). ResNet-18 training: {CNN_UTIL[0]:.0%}–{CNN_UTIL[1]:.0%} (small convolutions and "
        "per-channel GroupNorm keep CNN training far from peak). DDP adds a per-step cost for the gradient "
        "all-reduce (11.7 M parameters, 47 MB) and synchronisation: "
        + ", ".join(f"{n} GPUs {lo * 1e3:.0f}–{hi * 1e3:.0f} ms" for n, (lo, hi) in STEP_OVERHEAD_S.items() if n > 1)
        + " (assumed).",
        "",
        f"FLOPs per image, one forward (FlopCounterMode, 2 per multiply-add): ResNet-18 (mgd3's, instance norm, "
        f"224 px, 1000 classes) {f_r18 / 1e9:.2f} G; DiT-XL/2 {f_dit / 1e9:.0f} G; SD VAE encode "
        f"{f_enc / 1e9:.0f} G / decode {f_dec / 1e9:.0f} G (256 px). A training step costs 3 forwards "
        "(forward + backward), plus 1 teacher forward for the soft labels.",
        "",
    ]
    rows = []
    gpus = (1, 8, 16)
    # distillation: encode the train split once (cached, shared by both IPCs), generate per IPC
    enc = IN1K_TRAIN * f_enc
    rows.append(("distill: VAE-encode the train split (once, cached)", enc,
                 [_gpu(enc * _busiest(n), DIT_UTIL) for n in gpus]))
    for ipc in IPCS:
        gen = CLASSES * ipc * (50 * 2 * f_dit + f_dec)
        rows.append((f"distill IPC {ipc}: 50 steps x 2 forwards + decode, {CLASSES * ipc:,} images", gen,
                     [_gpu(gen * _busiest(n), DIT_UTIL) for n in gpus]))
    # the teacher: trained once by rank 0 on the full train split
    t_epochs = soft.teacher_epochs
    teacher = IN1K_TRAIN * t_epochs * 3 * f_r18
    rows.append((f"teacher: ResNet-18 on {IN1K_TRAIN:,} images x {t_epochs} epochs (rank 0 only, once)", teacher,
                 [_gpu(teacher, CNN_UTIL)] * 3))
    for ipc in IPCS:
        n_img = CLASSES * ipc
        b = rded_batch_size(ipc, CLASSES, n_img)
        steps = soft.epochs * math.ceil(n_img / b)
        per_seed = n_img * soft.epochs * 4 * f_r18 + 7 * IN1K_VAL * f_r18  # + 7 test evaluations
        total = per_seed * len(SEEDS)
        cells = []
        for n in gpus:
            lo, hi = _gpu(per_seed / n, CNN_UTIL)
            o_lo, o_hi = STEP_OVERHEAD_S[n]
            cells.append((len(SEEDS) * (lo + steps * o_lo), len(SEEDS) * (hi + steps * o_hi)))
        rows.append((f"evaluate IPC {ipc}: {len(SEEDS)} seeds x {soft.epochs} epochs, batch {b} "
                     f"({steps:,} steps a seed), DDP over all GPUs", total, cells))
    lines += ["| stage | PFLOP | 1 GPU | 8 GPUs (1 node) | 16 GPUs (2 nodes) |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {fl / 1e15:,.0f} | " + " | ".join(span(c) for c in cells) + " |" for name, fl, cells in rows]
    lines += [
        "",
        "- Distillation splits classes round-robin: the busiest of N GPUs has ⌈1000 / N⌉ classes (125 on 8, "
        "63 on 16). JPEG decoding, k-means and PNG writes (CPU; docs/SCALE.md) are not in this table.",
        "- The teacher is trained by rank 0 alone and cached; the other processes wait and receive it. "
        "mgd3 holds the train split in memory as uint8 for it: 1.28 M x 3 x 224² bytes = 193 GB of host RAM.",
        "- Evaluation: the auto mode picks DDP for 3 seeds on 8 or 16 GPUs (3 does not divide over them and "
        "the batch of 200 gives each GPU at least 12 images). At 16 GPUs the per-GPU batch is 12–13 images and "
        "the per-step overhead is a large share: 2 nodes gain little over 1 for this batch size.",
        "",
        f"Generated by `benchmarks/imagenet1k_recipe.py --costs` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d}.",
        "",
    ]
    return "\n".join(lines)


def _busiest(n: int) -> float:
    return math.ceil(CLASSES / n) / CLASSES


def _gpu(flops: float, util: tuple[float, float]) -> tuple[float, float]:
    return flops / (H100_BF16_PEAK * util[1]), flops / (H100_BF16_PEAK * util[0])


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the whole recipe on the tiny models, on the CPU")
    ap.add_argument("--work", default="/tmp/mgd3-recipe", help="dry run: working folder")
    ap.add_argument("--costs", action="store_true", help="write the per-stage cost table")
    ap.add_argument("--run", action="store_true", help="run the commands on this node")
    ap.add_argument("--ipcs", type=int, nargs="+", default=list(IPCS), choices=IPCS)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--rdzv-endpoint", default="127.0.0.1:29500", help="HOST:PORT of the rendezvous (nodes > 1)")
    ap.add_argument("--data-root", default="/data/imagenet")
    ap.add_argument("--class-map", default="wnids.txt")
    ap.add_argument("--out", default="runs")
    a = ap.parse_args(argv)
    if a.dry_run:
        return dry_run(a)
    if a.costs:
        text = costs()
        (ROOT / "benchmarks/results/imagenet1k_recipe.md").write_text(text)
        print(text)
        return 0
    for stage, cmd in commands(a):
        print(f"# {stage}\n{shlex.join(cmd)}")
        if a.run and subprocess.run(cmd).returncode != 0:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
