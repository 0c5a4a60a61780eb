"""`mgd3 distill`: its flags (every method's options among them) and the run from the command line."""

from __future__ import annotations

import argparse
import dataclasses

_TYPES = {"float": float, "int": int, "str": str, "float | None": float, "int | None": int}


def _method_option_fields() -> dict[str, tuple]:
    """flag -> (field, [method names]) over every registered method's options."""
    from mgd3.methods import load_methods, option_flag

    reg = load_methods()
    flags: dict[str, tuple] = {}
    for name in reg.names():
        opts = reg.get(name).Options
        for f in dataclasses.fields(opts) if opts else ():
            flag = option_flag(f)
            if flag in flags:
                flags[flag][1].append(name)
            else:
                flags[flag] = (f, [name])
    return flags


def add_parser(sub) -> None:
    p = sub.add_parser(
        "distill", help="distill a dataset into IPC synthetic images per class",
        description="Distill a dataset with a pretrained latent diffusion model. Writes "
                    "OUT/images/<NNN>-<class>/<k>.png (NNN: the class index), OUT/latents.pt, OUT/grid.png "
                    "and, last, OUT/manifest.json. "
                    "Re-running the same command after an interruption finishes the missing images only "
                    "(OUT/.mgd3-run.json holds the settings; other settings are refused without --overwrite). "
                    "Several processes or GPUs: torchrun --nproc_per_node N -m mgd3 distill ... shares the "
                    "classes out and writes the same set as one process.",
        argument_default=argparse.SUPPRESS, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _data_and_model_flags(p.add_argument_group("data and model"))
    _run_flags(p.add_argument_group("run"))
    _sampler_flags(p.add_argument_group("sampler"))
    _method_option_flags(p.add_argument_group("method options"))
    p.set_defaults(func=run)


def _data_and_model_flags(g) -> None:
    g.add_argument("--data", help="dataset: fashion-mnist, digits, imagenette, imagewoof, imageidc, "
                                  "imagenet100, or an image folder (class sub-folders)")
    g.add_argument("--classes", nargs="+", metavar="CLASS", help="distill only these classes (ids, names or indices)")
    g.add_argument("--data-root", help="ImageNet-1K root (train/<wnid>/...) for the named ImageNet subsets")
    g.add_argument("--class-map", help="file mapping class ids to model labels (JSON or 'id label' lines)")
    g.add_argument("--model", help="diffusers pipeline folder or cached Hugging Face repo id "
                                   "(default: the model mgd3 ships for --data, if any)")
    # [text-to-image] begin: Stable Diffusion options
    g.add_argument("--prompt", metavar="TEMPLATE",
                   help="text-to-image models: prompt template, {name} = the class name line, e.g. "
                        "'a photo of a {name}' (default '{name}': 'tench, Tinca tinca', as MGD³)")
    g.add_argument("--negative-prompt", metavar="TEXT",
                   help="text-to-image models: the prompt of the unconditional CFG branch (default empty)")
    g.add_argument("--resolution", type=int, help="generation resolution in pixels (default: the model's, "
                                                  "512 for SD v1.5; DiT generates at its own only)")
    g.add_argument("--save-resolution", type=int, help="resize images to this many pixels when writing them "
                                                       "(default: as generated; MGD³'s SD variant saves 256)")
    # [text-to-image] end


def _run_flags(g) -> None:
    from mgd3.methods import load_methods

    g.add_argument("--method", help=f"distillation method: {', '.join(load_methods().names())} (default mgd3)")
    g.add_argument("--ipc", type=int, help="images per class (default 10)")
    g.add_argument("--seed", type=int, help="global seed; image k of class c uses a seed derived "
                                            "from (seed, c, k) (default 0)")
    g.add_argument("--out", help="output folder: new, empty, or an unfinished run of the same settings "
                                 "(resumed); a complete set of the same settings is left as it is")
    g.add_argument("--overwrite", action="store_true", help="replace mgd3 outputs already in --out")
    g.add_argument("--strict", action="store_true", help="stop at a missing or unreadable image file of an "
                                                         "image-folder dataset (default: skip them with a warning)")
    g.add_argument("--batch-size", type=int, help="images per forward pass (default 32)")
    g.add_argument("--max-real-per-class", type=int, metavar="N",
                   help="find modes (and nearest real images) among a fixed random subset of N real "
                        "images per class instead of all of them (faster encoding; default all)")
    g.add_argument("--select-from", type=int, metavar="G",
                   help="generate G candidates per image and keep, per class, the IPC whose subgroup is "
                        "nearest the class's real latent centroid and farthest from the nearest other "
                        "class's (IMS3's S3; any generating method; default 1: no selection)")
    g.add_argument("--encode-batch-size", type=int, help="images per VAE encoding batch (default 64)")
    g.add_argument("--encode-workers", type=int, metavar="N",
                   help="DataLoader processes that read and decode real images for encoding "
                        "(default 0 on CPU, else all CPUs but one, up to 16 per process)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto (default auto)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="autocast precision (default fp32)")
    g.add_argument("--cache-dir", help="cache for VAE encodings and IGD's surrogate "
                                       "(default $MGD3_CACHE_DIR or ~/.cache/mgd3)")
    g.add_argument("--no-cache", action="store_true", help="encode the real images again instead of reading "
                                                           "their cached encodings, and write none (IGD, whose "
                                                           "surrogate lives in the cache, refuses it)")
    g.add_argument("--config", help="YAML file with any of these options (flag names without --); "
                                    "flags given on the command line win")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: every core; on a busy shared CPU, "
                                               "1 can be several times faster)")


def _sampler_flags(g) -> None:
    from mgd3.core.sampling import UPDATE_RULES

    g.add_argument("--sampler", choices=UPDATE_RULES.names(), help="DDPM ancestral or DDIM (default ddpm)")
    g.add_argument("--steps", type=int, help="sampling steps, respaced from the training schedule (default: "
                                              "the model's recommendation for the IPC, else 50)")
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's "
                                             "recommended value, else 4.0)")
    g.add_argument("--cfg-channels", type=int, help="apply CFG to the first N latent channels only "
                                                    "(3 = the original DiT code); default all")
    g.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="apply CFG only at the steps whose noise level sqrt((1-ᾱ_t)/ᾱ_t) is in (LOW, HIGH], "
                        "scale 1 at the others (Kynkäänniemi et al., 2024); default: the model's "
                        "recommendation, else every step")
    g.add_argument("--eta", type=float, help="DDIM eta (default 0)")


def _method_option_flags(g) -> None:
    """One flag per option of every registered method, its help naming the methods that take it."""
    from mgd3.methods import option_choices

    for flag, (f, methods) in _method_option_fields().items():
        default = "" if f.default is None else f"default {f.default}; "  # None: the help says what happens
        kw = {"help": f"{f.metadata['help']} ({default}methods: {', '.join(methods)})",
              "dest": "opt_" + f.name}
        choices = option_choices(f)
        if f.metadata.get("choices"):
            kw["choices"] = choices
        elif choices:  # a registry's names (--modes): shown here, checked by mgd3.config with the registry's message
            kw["metavar"] = "{" + ",".join(choices) + "}"
        if str(f.type) == "bool":
            kw["action"] = "store_true"
        else:
            kw["type"] = _TYPES.get(str(f.type), str)
            kw.setdefault("metavar", None if choices else flag.lstrip("-").replace("-", "_").upper())
        g.add_argument(flag, **kw)


def run(args) -> int:
    from mgd3.config import merged
    from mgd3.run.settings import distill_config
    from mgd3.run.driver import distill

    values, source = merged(args)
    cfg = distill_config(values, source)
    s = distill(cfg)
    if s.get("rank"):  # another process of a torchrun launch: rank 0 reports
        return 0
    if s.already_complete:
        print(f"{s['out']} already holds the complete set ({s['images']} images) for these settings; nothing to do")
        return 0
    if s.get("resumed"):
        print(f"resumed: {s['resumed']} images were already written by an interrupted run")
    print(f"wrote {s['images']} images ({s['classes']} classes × IPC {cfg.ipc}, method {cfg.method}) "
          f"to {s['out']}/images in {s['seconds']:.1f} s ({s['images_per_s']:.2f} images/s generation); "
          f"grid: {s['out']}/grid.png; manifest: {s['out']}/manifest.json")
    return 0
