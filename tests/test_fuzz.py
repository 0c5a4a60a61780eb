"""Fuzz every option of every sub-command through the real CLI in-process (`mgd3.cli.main`).

A seeded generator (MGD3_FUZZ_SEED, default 0) draws, per case, a sub-command, a few of its
options and for each a value of the right or of a wrong type (numbers out of range, NaN, huge
integers, strings, paths that do not exist or are files), given as flags or in a `--config`
YAML (where lists, mappings, booleans and nulls are possible too). Every case must end with exit
0 or 2, never a traceback; exit 2 is exactly one `mgd3: error:` line; a failed distill leaves no
manifest.json and a failed pretrain no model_index.json. Right values are kept small, so a case
that passes validation still runs in about a second; the whole test stops after
MGD3_FUZZ_SECONDS (default 50) and says how many cases it ran.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from mgd3.cli import main

SEED = int(os.environ.get("MGD3_FUZZ_SEED", "0"))
SECONDS = float(os.environ.get("MGD3_FUZZ_SECONDS", "50"))
MAX_CASES = int(os.environ.get("MGD3_FUZZ_CASES", "100000"))
CASE_SECONDS = float(os.environ.get("MGD3_FUZZ_CASE_SECONDS", "120"))


class CaseTooLong(Exception):
    pass


def _too_long(signum, frame):
    raise CaseTooLong(f"a single case ran over {CASE_SECONDS:.0f} s")

WRONG = ["ten", "", "nan", "inf", "-inf", "-1", "0", "1.7", "1e23", str(10**23), "-99999999999", "../x",
         "null", "[1, 2]", "true", " ", "\u00e9\u00e8", "--", "%s%n"]
WRONG_YAML = [None, True, False, [], [1, 2], {"a": 1}, "ten", "", 1.7, -1, 0, 10**23, float("nan"), float("inf"),
              -0.5, "../x", {"nested": [1, {"x": None}]}]


def small_int(rng):
    return rng.choice([1, 2, 3])


def small_float(rng):
    return rng.choice([0.0, 0.1, 0.5, 1.0, 2.0])


@dataclasses.dataclass
class Opt:
    flag: str
    right: list  # values of the right type and a small size
    kind: str = "value"  # "value", "switch" (store_true), "many" (nargs +)


def _distill_opts(ws: dict) -> list[Opt]:
    from mgd3.methods import method_option_fields, option_choices
    from mgd3.methods import option_flag

    opts = [
        Opt("--data", ["digits", "no-such-data", str(ws["file"])]),
        Opt("--classes", [["0"], ["0", "1"], ["7"], ["zzz"]], "many"),
        Opt("--data-root", [str(ws["dir"])]),
        Opt("--class-map", [str(ws["map_ok"]), str(ws["map_bad"]), str(ws["file"]), "/no/such/map"]),
        Opt("--model", [str(ws["model"]), str(ws["dir"]), "no-org/no-repo", str(ws["file"])]),
        Opt("--prompt", ["a {name}", "x"]), Opt("--negative-prompt", ["", "blurry"]),
        Opt("--resolution", [8, 16]), Opt("--save-resolution", [8, 12]),
        Opt("--method", ["plain", "mgd3", "random-real", "kmeans-real", "d4m", "dmgd"]),
        Opt("--ipc", [1, 2]), Opt("--seed", [0, 1, 7]), Opt("--overwrite", [], "switch"),
        Opt("--strict", [], "switch"), Opt("--batch-size", [1, 2, 32]), Opt("--max-real-per-class", [2, 5]),
        Opt("--encode-batch-size", [4, 64]), Opt("--encode-workers", [0]),
        Opt("--device", ["cpu", "auto", "cuda", "cuda:9", "tpu"]), Opt("--precision", ["fp32", "bf16"]),
        Opt("--cache-dir", [str(ws["cache"]), str(ws["file"])]), Opt("--quiet", [], "switch"),
        Opt("--threads", [1, 2]), Opt("--sampler", ["ddpm", "ddim"]), Opt("--steps", [1, 2, 3]), Opt("--cfg", [0.0, 1.0, 4.0]),
        Opt("--cfg-channels", [1, 3, 4, 9]), Opt("--eta", [0.0, 1.0]),
    ]
    for f in method_option_fields().values():
        flag = option_flag(f)
        choices = option_choices(f)
        t = str(f.type)
        if t == "bool":
            opts.append(Opt(flag, [], "switch"))
        elif choices:
            opts.append(Opt(flag, [c for c in choices if c not in ("spectral", "dbscan")]))
        elif "int" in t:
            opts.append(Opt(flag, [-1, 0, 1, 2]))
        else:
            opts.append(Opt(flag, [0.0, 0.3, 0.7, 1.0]))
    return opts


def _evaluate_opts(ws: dict) -> list[Opt]:
    return [
        Opt("--data", ["digits", "no-such", str(ws["dir"])]),
        Opt("--protocol", ["dc", "dc-dsa", "soft"]),
        Opt("--arch", ["convnet-3", "CONVNET-3", "resnet-18", "vgg"]),
        Opt("--reference", ["random-real", "full"]), Opt("--ipc", [1, 2]),
        Opt("--classes", [["0"], ["0", "1"], ["q"]], "many"), Opt("--data-root", [str(ws["dir"])]),
        Opt("--class-map", [str(ws["map_bad"]), "/no/such/map"]),
        Opt("--seeds", [[0], [1, 2]], "many"), Opt("--epochs", [1, 2]), Opt("--batch-size", [1, 8, 256]),
        Opt("--resolution", [8, 16]), Opt("--teacher-epochs", [1]), Opt("--dsa-same-params", [], "switch"),
        Opt("--option", ["lr=0.01", "cutmix_beta=1.0", "momentum=0.5", "schedule=cosine", "augment=none",
                         "eval_every=1", "milestones=[0.5]", "lr=abc", "nope=1", "dsa={'bogus': 1}",
                         "rrc_scale=[0.5, 1.0]", "loss=kl", "temperature=0"]),
        Opt("--device", ["cpu", "auto", "cuda", "x"]), Opt("--bf16", [], "switch"),
        Opt("--threads", [1, 2]), Opt("--workers", [0]), Opt("--no-reference", [], "switch"),
        Opt("--dist-mode", ["auto", "seeds", "ddp"]), Opt("--checkpoint-s", [0, 60, -1, "nan"]),
        Opt("--out", [str(ws["dir"] / "e.json"), str(ws["dir"])]),
        Opt("--cache-dir", [str(ws["cache"]), str(ws["file"])]), Opt("--no-cache", [], "switch"),
        Opt("--quiet", [], "switch"),
    ]


def _report_opts(ws: dict) -> list[Opt]:
    return [
        Opt("--data", ["digits", "no-such"]), Opt("--embedding", ["pca", "tsne", "umap"]),
        Opt("--max-real-per-class", [3, 20]), Opt("--plot-real-per-class", [0, 5]),
        Opt("--neighbors", [1, 5, 50]), Opt("--device", ["cpu", "auto", "cuda"]),
        Opt("--encode-batch-size", [4, 64]), Opt("--cache-dir", [str(ws["cache"]), str(ws["file"])]),
        Opt("--threads", [1, 2]), Opt("--quiet", [], "switch"),
    ]


def _pretrain_opts(ws: dict) -> list[Opt]:
    return [
        Opt("--data", ["digits", "no-such"]), Opt("--classes", [["0", "1"], ["x"]], "many"),
        Opt("--data-root", [str(ws["dir"])]), Opt("--resolution", [8, 16, 9]), Opt("--channels", [1, 3]),
        Opt("--limit", [32, 64]), Opt("--overwrite", [], "switch"), Opt("--vae-epochs", [1]),
        Opt("--vae-levels", [1, 2, 3]), Opt("--vae-width", [4, 8]), Opt("--latent-channels", [1, 4]),
        Opt("--vae-batch-size", [16, 32]), Opt("--vae-lr", [1e-3, 0.1]), Opt("--vae-loss", ["mse", "l1"]),
        Opt("--kl-weight", [0.0, 1e-6]), Opt("--size", ["tiny", "small"]), Opt("--patch-size", [1, 2, 3]),
        Opt("--epochs", [1, 2]), Opt("--train-steps", [1, 2]), Opt("--batch-size", [16, 32]),
        Opt("--lr", [1e-4, 3e-4]), Opt("--ema-decay", [0.0, 0.9]), Opt("--label-dropout", [0.0, 0.5]),
        Opt("--cfg", [1.0, 2.0]), Opt("--max-minutes", [0.5, 1.0]), Opt("--bf16", [], "switch"),
        Opt("--device", ["cpu", "auto", "cuda"]), Opt("--seed", [0, 3]), Opt("--max-steps", [1, 2]),
        Opt("--quality-real-epochs", [1]), Opt("--quality-cas-epochs", [1]), Opt("--quiet", [], "switch"),
    ]


@pytest.fixture(scope="module")
def workspace(digits_model, tmp_path_factory):
    ws = tmp_path_factory.mktemp("fuzz")
    (ws / "dir").mkdir()
    (ws / "file").write_text("not a folder\n")
    (ws / "map_ok.txt").write_text("0 0\n1 1\n")
    (ws / "map_bad.txt").write_bytes(b"\x00\xff garbage\n0 999\n")
    out = ws / "set"
    assert main(["distill", "--data", "digits", "--classes", "0", "1", "--ipc", "2", "--steps", "2", "--quiet",
                 "--device", "cpu", "--method", "plain", "--model", str(digits_model), "--out", str(out)]) == 0
    return {"root": ws, "dir": ws / "dir", "file": ws / "file", "map_ok": ws / "map_ok.txt",
            "map_bad": ws / "map_bad.txt", "model": digits_model, "set": out, "cache": ws / "cache"}


def _value_as_flag(rng, opt: Opt) -> list[str]:
    if opt.kind == "switch":
        return [opt.flag] if rng.random() < 0.9 else [opt.flag + "=x"]
    if rng.random() < 0.55 and opt.right:
        v = rng.choice(opt.right)
        return [opt.flag, *map(str, v)] if isinstance(v, list) else [opt.flag, str(v)]
    if opt.kind == "many" and rng.random() < 0.5:
        return [opt.flag, *rng.sample(WRONG, 2)]
    return [opt.flag, rng.choice(WRONG)]


def _value_for_yaml(rng, opt: Opt):
    if opt.kind == "switch":
        return rng.choice([True, False, "yes", 1, None, [True]])
    if rng.random() < 0.5 and opt.right:
        return rng.choice(opt.right)
    return rng.choice(WRONG_YAML + WRONG)


def _case(rng, sub: str, ws: dict, case_dir: Path) -> tuple[list[str], Path | None, str]:
    opts = {"distill": _distill_opts, "evaluate": _evaluate_opts, "report": _report_opts,
            "pretrain": _pretrain_opts}[sub](ws)
    chosen = rng.sample(opts, rng.choice([1, 2, 3]))
    out = case_dir / "out"
    if sub == "distill":
        base = ["distill", "--data", "digits", "--classes", "0", "--ipc", "1", "--steps", "2", "--method", "plain",
                "--model", str(ws["model"]), "--device", "cpu", "--quiet", "--out", str(out)]
        done = "manifest.json"
    elif sub == "evaluate":
        base = ["evaluate", str(ws["set"]), "--epochs", "1", "--seeds", "0", "--teacher-epochs", "1", "--device",
                "cpu", "--quiet", "--out", str(case_dir / "eval.json"), "--cache-dir", str(case_dir / "cache")]
        done, out = None, None
    elif sub == "report":
        base = ["report", str(ws["set"]), "--out", str(out), "--embedding", "pca", "--quiet", "--device", "cpu",
                "--no-evaluate"]
        done = None
    else:
        base = ["pretrain", "--data", "digits", "--out", str(out), "--limit", "32", "--vae-epochs", "1", "--epochs",
                "1", "--size", "tiny", "--max-steps", "1", "--batch-size", "16", "--vae-width", "4",
                "--vae-levels", "2", "--device", "cpu", "--quiet"]
        done = "model_index.json"
    if rng.random() < 0.35:  # options in a YAML file (flags on the command line win)
        cfg = {}
        for o in chosen:
            key = o.flag.lstrip("-") if rng.random() < 0.7 else o.flag.lstrip("-").replace("-", "_")
            cfg[key] = _value_for_yaml(rng, o)
        if rng.random() < 0.1:
            cfg[rng.choice(["nope", "ipcc", "__class__"])] = 1
        f = case_dir / "c.yaml"
        try:
            f.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        except yaml.YAMLError:
            f.write_text(json.dumps(cfg, default=str))
        argv = [*base, "--config", str(f)]
    else:
        argv = list(base)
        for o in chosen:
            argv += _value_as_flag(rng, o)
    return argv, (out / done if done and out else None), sub


def test_fuzz_every_option_of_every_subcommand(workspace, tmp_path, capsys, record_property, monkeypatch):
    cwd = tmp_path / "cwd" / "here"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)  # relative values ("ten", "../x") land inside tmp_path
    rng = random.Random(SEED)
    subs = ["distill", "distill", "evaluate", "report", "pretrain"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    previous = signal.signal(signal.SIGALRM, _too_long)
    start, n, outcomes = time.perf_counter(), 0, {0: 0, 2: 0}
    try:
        while time.perf_counter() - start < SECONDS and n < MAX_CASES:
            case_dir = tmp_path / f"case-{n}"
            case_dir.mkdir()
            argv, done_file, sub = _case(rng, rng.choice(subs), workspace, case_dir)
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)  # a case that passes validation stays small
            try:
                code = main(argv)
            except BaseException as e:  # a traceback (or a case that ran too long): the case, and what escaped
                raise AssertionError(f"case {n} (seed {SEED}) raised {type(e).__name__}: {e}\n"
                                     f"mgd3 {' '.join(argv)}") from e
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                torch.set_num_threads(1)  # --threads may have changed it
            err = capsys.readouterr().err
            assert code in (0, 2), f"case {n}: exit {code}\nmgd3 {' '.join(argv)}\n{err}"
            if code == 2:
                errors = [line for line in err.splitlines() if "error:" in line]
                assert len(errors) == 1 and errors[0].startswith("mgd3: error: "), \
                    f"case {n}: mgd3 {' '.join(argv)}\n{err}"
                if done_file is not None:
                    assert not done_file.exists(), f"case {n}: {done_file} after a failure\nmgd3 {' '.join(argv)}"
            outcomes[code] += 1
            n += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
        torch.set_num_threads(threads)
    record_property("fuzz_cases", n)
    print(f"\nfuzz: {n} cases in {time.perf_counter() - start:.0f} s (seed {SEED}): {outcomes[0]} ran, "
          f"{outcomes[2]} refused in one line")
    assert n >= 20 and outcomes[0] > 0 and outcomes[2] > 0
