"""A model folder's `mgd3.json`: the settings tuned for that model, used when the command line
does not give them. `{"defaults": {"cfg": 1.5, "steps": 50, "methods": {"mgd3": {"lambda": 0.3}},
"by_ipc": [{"ipc": [5, 20], "methods": {...}, "evidence": "..."}]}}`. This module checks the
format and the sampler settings; what a method's options may hold is the method layer's check.
"""

from __future__ import annotations

from mgd3.config import STEPS, Rule, short, convert
from mgd3.errors import Mgd3Error

# the sampler settings a model's mgd3.json may recommend: folder-wide, in a "by_ipc" entry, or among
# a method's options (then that method's own; Backend.defaults_at)
SAMPLER_RECOMMENDATIONS = ("cfg", "steps", "cfg_interval")


def check_recommended(defaults, source: str, by_ipc: bool = True) -> dict:
    """A model's recommended settings (mgd3.json "defaults"): a mapping, cfg a finite number >= 0
    and steps an integer >= 1 (both also per method), method options a mapping per method
    (their names and values are checked by the method layer, `mgd3.methods.check_recommendations`); `by_ipc`
    a list of such mappings, each with an inclusive "ipc": [low, high] range (ranges must not
    overlap)."""
    if defaults is None:
        return {}
    if not isinstance(defaults, dict):
        raise Mgd3Error(f"{source}: \"defaults\" must be a mapping, got {short(defaults)}")
    if "by_ipc" in defaults:
        if not by_ipc:
            raise Mgd3Error(f"{source}: a \"by_ipc\" entry cannot hold another \"by_ipc\"")
        defaults = {**defaults, "by_ipc": _check_by_ipc(defaults["by_ipc"], source)}
    for key in SAMPLER_RECOMMENDATIONS:
        if key in defaults:
            defaults = {**defaults, key: _sampler_recommendation(key, defaults[key], source, "")}
    methods = defaults.get("methods")
    if methods is not None:
        if not isinstance(methods, dict) or not all(isinstance(v, dict) for v in methods.values()):
            raise Mgd3Error(f"{source}: \"methods\": each method's recommendation must be a mapping of option: value")
        checked = {}
        for m, opts in methods.items():
            conv = dict(opts)  # method options are the method layer's to check (mgd3.methods.check_recommendations)
            for k, v in opts.items():
                if k in SAMPLER_RECOMMENDATIONS:  # the method's own CFG scale or steps (Backend.defaults_at)
                    conv[k] = _sampler_recommendation(k, v, source, f" of method {m}")
            checked[m] = conv
        defaults = {**defaults, "methods": checked}
    return defaults


def _sampler_recommendation(key: str, value, source: str, where: str):
    """A recommended CFG scale (a finite number >= 0), step count (as --steps allows) or CFG
    interval ([LOW, HIGH] as --cfg-interval allows)."""
    if key == "cfg_interval":
        from mgd3.core.sampling import check_cfg_interval

        return check_cfg_interval(convert(key, value, "tuple[float, float]", source), f"{source}: {key}{where}")
    v = convert(key, value, "float" if key == "cfg" else "int", source)
    (Rule(minimum=0.0) if key == "cfg" else STEPS).check(f"{source}: {key}{where}", v)
    return v


def _check_by_ipc(entries, source: str) -> list[dict]:
    """mgd3.json "by_ipc": [{"ipc": [low, high], "cfg": ..., "steps": ..., "methods": {...},
    "evidence": "..."}]."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise Mgd3Error(f"{source}: \"by_ipc\" must be a list of mappings, got {short(entries)}")
    checked, seen = [], []
    for e in entries:
        rng = e.get("ipc")
        if not (isinstance(rng, list) and len(rng) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in rng) and 1 <= rng[0] <= rng[1]):
            raise Mgd3Error(f"{source}: every \"by_ipc\" entry needs \"ipc\": [low, high], two integers "
                            f"1 <= low <= high, got {short(rng)}")
        for lo, hi in seen:
            if rng[0] <= hi and lo <= rng[1]:
                raise Mgd3Error(f"{source}: \"by_ipc\" ranges {[lo, hi]} and {rng} overlap")
        seen.append(tuple(rng))
        if "evidence" in e and not isinstance(e["evidence"], str):
            raise Mgd3Error(f"{source}: \"evidence\" of a \"by_ipc\" entry must be a string")
        checked.append(check_recommended(e, f"{source} (by_ipc {rng})", by_ipc=False))
    return checked

