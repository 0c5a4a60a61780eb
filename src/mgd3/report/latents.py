"""The latents a report measures: a set's distilled latents (latents.pt, else its images encoded by
the VAE) and the real latents of its data, the very subset and encodings the methods used."""

from __future__ import annotations

import json
import logging

import numpy as np

from mgd3.config import resolve_device
from mgd3.errors import Mgd3Error
from mgd3.report.sets import SetInfo, set_model
from mgd3.report.settings import ReportConfig

log = logging.getLogger(__name__)


class LatentSource:
    """Backends, real data and real latents, loaded once per (model, data, classes, subset)."""

    def __init__(self, cfg: ReportConfig):
        self.cfg = cfg
        self._backends: dict[str, object] = {}
        self._real: dict[tuple, tuple] = {}  # key -> (backend, data, real latents)

    def backend(self, model: str):
        from mgd3.backends import load_backend

        if model not in self._backends:
            device = resolve_device(self.cfg.device)
            self._backends[model] = load_backend(model, device=device)
        return self._backends[model]

    def real(self, s: SetInfo) -> tuple[object, dict[str, np.ndarray], int | None]:
        """(backend, {class id: (N_c, D) real latents}, max_real_per_class used)."""
        from mgd3.io.data import load_data
        from mgd3.core.encode import real_latents

        from mgd3.io.data import DATASETS
        from mgd3.io.set_reader import named_outside

        m = s.manifest
        config = m.get("config") or {}
        model = set_model(s)
        n_max = self.cfg.max_real_per_class
        if n_max is None:
            n_max = config.get("max_real_per_class")
        d = m.get("data") or {}
        name = self.cfg.data or d.get("name")
        data_root = None
        if not self.cfg.data:  # what the manifest names is read only inside the set (issue 32)
            if isinstance(name, str) and name not in DATASETS:
                name = named_outside(s.path, name, "the data folder", f"--data {name}")
            data_root = named_outside(s.path, d.get("data_root"), "the data root",
                                      f"--data {d.get('name')}:{d.get('data_root')}")
        class_map = config.get("class_map")
        if class_map is not None:  # labels do not change latents: an outside map is not read, only said
            try:
                class_map = named_outside(s.path, class_map, "the class map", "")
            except Mgd3Error:
                log.warning("%s/manifest.json names a class map outside the set; not read", s.path)
                class_map = None
        key = (str(model), name, json.dumps(d.get("classes")), data_root, n_max)
        if key not in self._real:
            backend = self.backend(str(model))
            # the classes the set was distilled with, so the data fingerprint (and the encoding cache) match
            data = load_data(name, "train", resolution=backend.resolution, channels=backend.image_channels,
                             classes=d.get("classes"), data_root=data_root, class_map=class_map)
            # the very subset and encodings the methods used
            lat = real_latents(backend, data, range(len(data.class_ids)), max_per_class=n_max,
                               batch_size=self.cfg.encode_batch_size, cache_dir=self.cfg.cache_dir,
                               progress=self.cfg.progress)
            self._real[key] = (backend, data, lat)
        backend, data, lat = self._real[key]
        real = {cid: lat[c].numpy().reshape(len(lat[c]), -1) for c, cid in enumerate(data.class_ids)}
        return backend, real, n_max

    def distilled(self, s: SetInfo, backend) -> dict[str, np.ndarray]:
        """{class id: (n_c, D)} latents of the set: latents.pt, else the images encoded by the VAE."""
        import torch

        recs = s.manifest["images"]
        by_path = {str(r["path"]): str(r["class_id"]) for r in recs}
        f = s.path / "latents.pt"
        if f.is_file():
            from mgd3.io.set_reader import read_latents

            obj = read_latents(s.path)
            lat = obj["latents"].numpy()  # (N, C, h, w)
            paths = obj.get("paths") or [r["path"] for r in recs]
            if len(paths) != len(lat):
                raise Mgd3Error(f"{f}: {len(lat)} latents but {len(paths)} paths")
            cids = [by_path.get(str(p)) for p in paths]
            if None in cids:
                raise Mgd3Error(f"{f} names an image that manifest.json does not list")
        else:
            from mgd3.io.sources import read_image, to_model_space

            log.info("%s: no latents.pt, encoding its %d images with the VAE", s.path, len(recs))
            parts, bs = [], self.cfg.encode_batch_size
            with torch.no_grad():
                for i in range(0, len(recs), bs):
                    x = torch.stack([to_model_space(read_image(s.files[str(r["path"])], backend.image_channels,
                                                               backend.resolution),
                                                    backend.resolution, backend.image_channels)
                                     for r in recs[i:i + bs]])  # (B, C, R, R) in [-1, 1]
                    parts.append(backend.encode(x).float().cpu().numpy())  # (B, c, h, w)
            lat = np.concatenate(parts)
            cids = [str(r["class_id"]) for r in recs]
        flat = lat.reshape(len(lat), -1)
        out: dict[str, list] = {}
        for cid, v in zip(cids, flat):
            out.setdefault(cid, []).append(v)
        return {cid: np.stack(v) for cid, v in out.items()}
