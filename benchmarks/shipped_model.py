"""Train (or size-sweep) the model mgd3 ships, and measure its quality with mgd3's own code.

    # brief comparison of sizes (same short budget each), results table to stdout/--report
    python benchmarks/shipped_model.py --sweep small medium base --epochs 10 --device cuda --bf16
    # the shipped model: train, measure, write MODEL_CARD.md, copy the folder to --dest
    python benchmarks/shipped_model.py --size medium --epochs 60 --device cuda --bf16 \
        --dest src/mgd3/models/fashion-mnist

Quality (issue goals): class fidelity = a ConvNet-3 trained on the real train set classifies
1000 plain samples (goal >= 90 %); CAS = ConvNet-3 trained on 50 plain samples per class tested
on the real test set, next to 50 random real per class (goal: within 3 points).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from mgd3.train.model_card import write_model_card
from mgd3.train.pretrain import pretrain
from mgd3.train.pretrain_settings import SIZES, PretrainConfig
from mgd3.train.quality import measure


def train_and_measure(args, size: str, out: Path) -> tuple[dict, dict]:
    cmd = "python benchmarks/shipped_model.py " + " ".join(sys.argv[1:])
    cfg = PretrainConfig(data=args.data, out=str(out), size=size, epochs=args.epochs, vae_epochs=args.vae_epochs,
                         batch_size=args.batch_size, lr=args.lr, bf16=args.bf16, device=args.device,
                         cfg=args.cfg, overwrite=True, progress=False, command=cmd, limit=args.limit,
                         max_steps=args.max_steps)
    t = time.perf_counter()
    pretrain(cfg)
    train_s = time.perf_counter() - t
    q = measure(out, args.data, device=args.device, real_epochs=args.real_epochs, cas_epochs=args.cas_epochs,
                fidelity_per_class=args.fidelity_per_class, cas_ipc=args.cas_ipc, workdir=out / ".quality")
    meta = json.loads((out / "mgd3.json").read_text())
    q["train_wall_s"] = round(train_s, 1)
    q["transformer_params_M"] = round(meta["transformer_params"] / 1e6, 3)
    q["final_dit_loss"] = round(meta["stats"]["dit_loss"][-1], 4)
    return q, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--sweep", nargs="+", choices=list(SIZES))
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--vae-epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--real-epochs", type=int, default=10)
    ap.add_argument("--cas-epochs", type=int, default=300)
    ap.add_argument("--cas-ipc", type=int, default=50)
    ap.add_argument("--fidelity-per-class", type=int, default=100)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--work", default="/tmp/mgd3-shipped")
    ap.add_argument("--dest", help="copy the finished folder here (shipped files only)")
    ap.add_argument("--report", help="write the markdown result here")
    args = ap.parse_args()

    dev = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "CPU"
    head = [f"Command: `python benchmarks/shipped_model.py {' '.join(sys.argv[1:])}`",
            f"Device: {dev}; torch {torch.__version__}; measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    work = Path(args.work)
    if args.sweep:
        rows = []
        for size in args.sweep:
            q, _ = train_and_measure(args, size, work / size)
            rows.append((size, q))
            print(size, json.dumps(q), flush=True)
        keys = [k for k in rows[0][1] if k != "settings"]
        lines = ["# Shipped-model size sweep", ""] + head
        lines += ["| size | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {s} | " + " | ".join(str(q[k]) for k in keys) + " |" for s, q in rows]
        lines += ["", rows[0][1]["settings"]]
    else:
        out = work / args.size
        q, meta = train_and_measure(args, args.size, out)
        from mgd3.io.data import load_data

        data = load_data(args.data)
        cfg = PretrainConfig(**{k: v for k, v in meta["config"].items()})
        settings = q.pop("settings")
        write_model_card(out, cfg, data, meta["stats"], meta["transformer_params"], args.device,
                         quality={**q, "how": settings})
        lines = ["# Shipped model", ""] + head + [f"- {k}: {v}" for k, v in q.items()] + [f"- how: {settings}"]
        if args.dest:
            dest = Path(args.dest)
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(out, dest, ignore=shutil.ignore_patterns(".checkpoints", ".quality", "samples"))
            last = sorted((out / "samples").glob("*.png"))
            if last:
                shutil.copy(last[-1], dest.parent / f"{dest.name}-samples.png")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        Path(args.report).write_text(text)


if __name__ == "__main__":
    main()
