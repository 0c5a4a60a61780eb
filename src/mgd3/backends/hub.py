"""Fetching a pipeline from the Hugging Face hub: only the files a backend loads.

A repo such as a Stable Diffusion one holds several copies of every weight (fp16 and ema variants,
.bin next to .safetensors, a single-file .ckpt, Flax and ONNX exports); `from_pretrained` reads
one: per component folder the un-suffixed `diffusion_pytorch_model` / `model` weights, safetensors
when the folder has them, else .bin (sharded or not). Configs, tokenizer files and mgd3.json are
small and all fetched.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

# weights of one component, as from_pretrained looks for them (no variant): name[-0000k-of-0000n].ext
_WEIGHTS = re.compile(r"(diffusion_pytorch_model|model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)")
_SMALL = (".json", ".txt", ".model")  # configs, shard indexes, tokenizer vocab / merges / sentencepiece
# component folders whose weights mgd3's backends load (a backend that loads another adds it here);
# others (safety_checker, image_encoder, ...) are left on the hub
WEIGHT_FOLDERS = ("transformer", "unet", "vae", "vqvae", "text_encoder")


def files_to_fetch(repo_files: list[str]) -> list[str]:
    """The files of `repo_files` (paths in the repo) that loading the pipeline reads."""
    weights: dict[str, dict[str, list[str]]] = {}  # folder -> extension -> files
    keep = []
    for f in repo_files:
        p = PurePosixPath(f)
        if len(p.parts) > 2:  # pipelines are one level deep
            continue
        m = _WEIGHTS.fullmatch(p.name)
        if m and len(p.parts) == 2 and p.parts[0] in WEIGHT_FOLDERS:
            weights.setdefault(str(p.parent), {}).setdefault(m.group(3), []).append(f)
        elif not m and p.suffix in _SMALL and not p.name.startswith("."):
            keep.append(f)
    for by_ext in weights.values():
        keep += by_ext.get("safetensors") or by_ext.get("bin", [])
    return sorted(keep)


def download(model: str) -> Path:
    """snapshot_download of a repo id, fetching only `files_to_fetch` of its file list."""
    from huggingface_hub import HfApi, snapshot_download

    files = files_to_fetch(HfApi().list_repo_files(model))
    return Path(snapshot_download(model, allow_patterns=files))
