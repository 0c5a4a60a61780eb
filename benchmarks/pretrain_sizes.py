"""Which DiT size to ship: the same CPU budget for each size, loss and sample quality per CPU
minute, so the size for the ~90-minute shipped model can be picked on numbers.

    nice -n 10 .venv/bin/python benchmarks/pretrain_sizes.py --sizes small medium base \
        --cpu-minutes 12 --bf16 --report benchmarks/results/pretrain_sizes.md

Run it again with `--keep` and a larger `--cpu-minutes` to continue every arm to the longer
budget (checkpoints) instead of starting over.

The budget is CPU time of one thread (`--threads 1` by default): on a machine shared with other
jobs, wall time says more about the neighbours than about the model. Each size is calibrated
(CPU seconds per optimiser step, 3 steps) and then trained by the real `mgd3 pretrain`
(`mgd3.train.pretrain.pretrain`) for the steps that fit its budget (`--train-steps`); the VAE is trained
once (by the first size) and its checkpoint copied to the others, so every DiT sees the same
latents. Per size it records: params, CPU seconds per step, epochs/steps reached,
train loss, held-out ε-MSE of the EMA model after every epoch (fixed t and noise: a curve
without sampling noise), and three quick quality proxies on plain samples (`mgd3 distill
--method plain`, 50 DDPM steps, the recommended CFG):
  - class fidelity: a ConvNet-3 trained on the full real train set (a few epochs) classifies them;
  - CAS: a ConvNet-3 trained on them, tested on the real test set, next to random real images;
  - spread: mean pairwise latent distance within a class, generated / random real (1 = as diverse).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _tensors(data):
    loader = torch.utils.data.DataLoader(data.dataset(), batch_size=1000)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def spread(latents: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the mean pairwise L2 distance among the class's latents."""
    out = []
    for c in labels.unique():
        z = latents[labels == c].flatten(1)
        d = torch.cdist(z, z)
        n = len(z)
        out.append((d.sum() / max(n * (n - 1), 1)).item())
    return float(np.mean(out))


def main() -> None:
    from mgd3.train.pretrain_settings import PretrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--sizes", nargs="+", default=["small", "medium", "base"],
                    help="size presets; SIZE:key=value,... also sets config fields for that arm "
                         "(e.g. small:batch_size=128)")
    ap.add_argument("--cpu-minutes", type=float, default=12.0, help="DiT training budget per size (CPU minutes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--limit", type=int, help="train images (random subset); default all")
    ap.add_argument("--vae-epochs", type=int, default=2)
    ap.add_argument("--vae-width", type=int, default=PretrainConfig.vae_width)
    ap.add_argument("--vae-batch-size", type=int, default=PretrainConfig.vae_batch_size)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--per-class", type=int, default=50, help="plain samples per class for the proxies")
    ap.add_argument("--real-epochs", type=int, default=2, help="epochs of the real-data ConvNet-3 (fidelity)")
    ap.add_argument("--cas-epochs", type=int, default=100, help="epochs of the CAS ConvNet-3s")
    ap.add_argument("--work", default="/tmp/mgd3-pretrain-sizes")
    ap.add_argument("--report", help="write the markdown result here")
    ap.add_argument("--keep", action="store_true",
                    help="reuse --work: continue each arm's training up to the new --cpu-minutes and reuse the "
                         "reference classifiers (a longer budget without starting over)")
    args = ap.parse_args()

    import logging

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("diffusers", "huggingface_hub", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    from mgd3.backends import load_backend
    from mgd3.io.data import load_data
    from mgd3.run.driver import DistillConfig, distill
    from mgd3.methods import SamplerConfig
    from mgd3.machine import cpu_name
    from mgd3.train.dit_stage import calibrate
    from mgd3.train.pretrain import pretrain
    from mgd3.api import load_set
    from mgd3.evaluation.networks import build_network
    from mgd3.evaluation.train import TensorSet
    from mgd3.files import to_uint8
    from mgd3.train.quality import classifier_accuracy, per_class_subset, subset, train_classifier

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/pretrain_sizes.py " + " ".join(sys.argv[1:])
    train, test = load_data(args.data, "train"), load_data(args.data, "test")
    xtr, ytr = _tensors(train)
    xte, yte = _tensors(test)
    k = len(train.class_ids)
    tr, te = TensorSet(to_uint8(xtr), ytr), TensorSet(to_uint8(xte), yte)  # uint8, as mgd3.evaluation trains

    # the real-data classifier for class fidelity and the random-real CAS reference, trained once
    real_idx = per_class_subset(ytr, args.per_class, 0)
    refs_file, net_file = work / "references.json", work / "real_convnet.pt"
    if args.keep and refs_file.is_file() and net_file.is_file():
        real_net = build_network("convnet-3", xtr.shape[1], k, xtr.shape[-1]).to(args.device)
        real_net.load_state_dict(torch.load(net_file, map_location=args.device, weights_only=True))
        real_net.eval()
        real_acc, real_s, cas_real = (json.loads(refs_file.read_text())[key] for key in ("real_acc", "real_s", "cas_real"))
    else:
        t = time.perf_counter()
        real_net, real_acc = train_classifier(tr, te, k, epochs=args.real_epochs, seed=0, device=args.device)
        real_s = time.perf_counter() - t
        # the random-real reference for CAS: same budget, `per_class` random real images per class
        cas_real = train_classifier(subset(tr, real_idx), te, k, epochs=args.cas_epochs, seed=0, device=args.device)[1]
        torch.save(real_net.state_dict(), net_file)
        refs_file.write_text(json.dumps({"real_acc": real_acc, "real_s": real_s, "cas_real": cas_real}))
    logging.info("real ConvNet-3: %.2f %% test accuracy; CAS of random real: %.2f %%", real_acc, cas_real)

    rows, curves, first = [], {}, None
    for arm in args.sizes:
        size, _, extra = arm.partition(":")
        overrides = {k: type(getattr(PretrainConfig, k))(v) if getattr(PretrainConfig, k, None) is not None else int(v)
                     for k, v in (kv.split("=") for kv in extra.split(",") if kv)}
        out = work / arm.replace(":", "_").replace(",", "_").replace("=", "")
        if out.exists() and not args.keep:
            shutil.rmtree(out)
        if first is not None and not (out / ".checkpoints" / "vae.pt").exists():  # the same VAE for every size
            (out / ".checkpoints").mkdir(parents=True, exist_ok=True)
            for f in ("vae.pt", "vae.json"):
                shutil.copy(first / ".checkpoints" / f, out / ".checkpoints" / f)
        cfg = PretrainConfig(data=args.data, out=str(out), size=size, vae_epochs=args.vae_epochs,
                             vae_width=args.vae_width, vae_batch_size=args.vae_batch_size, limit=args.limit,
                             batch_size=args.batch_size, lr=args.lr, cfg=args.cfg, bf16=args.bf16, device=args.device,
                             progress=False, command=command)
        cfg = dataclasses.replace(cfg, **overrides)
        cpu_step = calibrate(cfg, latent_size=train.resolution // 2 ** (cfg.vae_levels - 1), num_classes=k)
        cfg.train_steps = max(1, int(args.cpu_minutes * 60 / cpu_step))
        logging.info("%s: %.3f CPU s/step -> %d steps", size, cpu_step, cfg.train_steps)
        load0 = os.getloadavg()[0]
        meta = out / ".checkpoints" / "dit.json"
        done = json.loads(meta.read_text()).get("step", 0) if meta.is_file() else 0
        if done < cfg.train_steps or not (out / "model_index.json").is_file():
            pretrain(cfg)  # with --keep: continues the arm's training up to the new budget
        else:
            logging.info("%s: already trained for %d >= %d steps", arm, done, cfg.train_steps)
        first = first or out
        info = json.loads((out / "mgd3.json").read_text())
        st = info["stats"]
        dit_s = float(np.sum(st["dit_epoch_s"]))
        dit_cpu = float(np.sum(st["dit_epoch_cpu_s"]))
        steps = st["dit_steps"][-1]

        # plain samples through the real distill path (PNG round trip included)
        t = time.perf_counter()
        distill(DistillConfig(data=args.data, out=str(out / "plain"), model=str(out), method="plain",
                              ipc=args.per_class, batch_size=250, device=args.device, progress=False,
                              overwrite=True, sampler=SamplerConfig(cfg=args.cfg)))
        sample_s = time.perf_counter() - t
        made = load_set(out / "plain")
        xs, ys = made.images.float() / 127.5 - 1.0, made.labels  # (N, C, R, R) in [-1, 1]
        fidelity = classifier_accuracy(real_net, TensorSet(made.images, ys), args.device)
        cas = train_classifier(TensorSet(made.images, ys), te, k, epochs=args.cas_epochs, seed=0, device=args.device)[1]
        b = load_backend(out, device=args.device)
        z_gen = torch.cat([b.encode(xs[i:i + 500]) for i in range(0, len(xs), 500)]).cpu()
        z_real = torch.cat([b.encode(xtr[real_idx][i:i + 500]) for i in range(0, len(real_idx), 500)]).cpu()
        ratio = spread(z_gen, ys) / spread(z_real, ytr[real_idx])
        row = {
            "size": arm,
            "params_M": round(info["transformer_params"] / 1e6, 2),
            "cpu_s_per_step": round(dit_cpu / steps, 3),
            "cpu_min_per_epoch": round(dit_cpu / steps * np.ceil(len(train) / cfg.batch_size) / 60, 2),
            "steps": steps,
            "epochs": round(steps / np.ceil((args.limit or len(train)) / cfg.batch_size), 2),
            "cpu_min": round(dit_cpu / 60, 1),
            "wall_min": round(dit_s / 60, 1),
            "train_loss_last_epoch": round(st["dit_loss"][-1], 4),
            "val_loss": st["dit_val_loss"][-1],
            "fidelity_%": round(fidelity, 1),
            "CAS_%": round(cas, 1),
            "spread_gen/real": round(ratio, 3),
            "sample_s": round(sample_s, 1),
            "load_avg": f"{load0:.1f}->{os.getloadavg()[0]:.1f}",
        }
        rows.append(row)
        minutes = np.cumsum(st["dit_epoch_cpu_s"]) / 60
        every = max(1, len(minutes) // 12)
        curves[arm] = list(zip(np.round(minutes, 1).tolist(), st["dit_val_loss"]))[::-1][::every][::-1]
        logging.info("%s", json.dumps(row))

    vae_st = json.loads((first / "mgd3.json").read_text())["stats"]
    keys = list(rows[0])
    lines = [
        "# `mgd3 pretrain`: DiT size vs. quality on a fixed CPU budget",
        "",
        f"Command: `{command}`",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores shared with other "
        f"users (load average per row), torch {torch.__version__} ({torch.get_num_threads()} thread(s)), "
        f"device {args.device}, bf16 autocast {args.bf16}; measured "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Data: {args.data}, {args.limit or len(train)} train images; DiT budget {args.cpu_minutes:g} CPU minutes "
        f"per size (`--train-steps` from a 3-step calibration), batch {args.batch_size}, lr {args.lr:g}, "
        "EMA 0.999 with warm-up, label dropout 0.1.",
        f"Shared VAE: width {args.vae_width}, {args.vae_epochs} epochs, {sum(vae_st['vae_epoch_cpu_s']) / 60:.1f} CPU "
        f"min, test PSNR {vae_st.get('vae_test_psnr_db')} dB.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    lines += [
        "",
        f"References: real-data ConvNet-3 ({args.real_epochs} epochs, full train set) {real_acc:.1f} % on the test "
        f"set ({real_s / 60:.1f} min); CAS with {args.per_class} random real images per class: {cas_real:.1f} %.",
        f"Proxies: {args.per_class} plain samples per class (`mgd3 distill --method plain`, 50 DDPM steps, "
        f"CFG {args.cfg}); CAS ConvNet-3s {args.cas_epochs} epochs (DC optimiser); spread = mean pairwise "
        "VAE-latent distance within a class, generated / the same number of random real images.",
        "`cpu_min_per_epoch` = measured CPU s/step x the steps of one epoch of the full train set "
        "(wall minutes on 2 idle cores with 2 threads are roughly half).",
        "",
        "Held-out ε-MSE of the EMA model (fixed t and noise, 2000 test latents) by DiT training CPU minutes:",
        "",
    ]
    lines += [f"- {s}: " + ", ".join(f"{m} min {v:.4f}" for m, v in c) for s, c in curves.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text)


if __name__ == "__main__":
    main()
