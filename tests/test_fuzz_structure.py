"""Structure-aware fuzzing (hypothesis) of every file format mgd3 reads from outside and of CLI
argument vectors: YAML configs and class maps through the real CLI in-process (`mgd3.cli.main`),
manifests (`mgd3.api.load_set`), eval.json (`mgd3.report.read_evals`) and a model's mgd3.json and
configs (`mgd3.backends.load_backend`) through the API that reads them.

Property: a clean result, or `Mgd3Error` / exit 2 with exactly one `mgd3: error:` line, and no
manifest.json written by a refused run. Values are drawn to hurt: integers past Python's
4300-digit limit, nesting thousands deep, NaN/inf, YAML aliases, non-UTF-8 bytes.

Budget: the "ci" profile (default) runs a few examples per test (seconds); MGD3_HYPOTHESIS=deep
runs 300 per test. Hypothesis's example database is off (`database=None`): nothing is written
to the repository.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mgd3.cli import main
from mgd3.errors import Mgd3Error

settings.register_profile("ci", max_examples=6, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("deep", max_examples=300, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("MGD3_HYPOTHESIS", "ci"))
pytestmark = pytest.mark.usefixtures("one_thread")

DISTILL_KEYS = ["ipc", "steps", "seed", "cfg", "batch_size", "method", "classes", "resolution", "lambda", "modes",
                "mode_seed", "t_stop", "strict", "precision", "data", "model", "out", "no_such_key"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.integers(min_value=-(10**30), max_value=10**30),
    st.just("9" * 5000), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["nan", "inf", "-1", "0", "1e400", "../x", "/etc/passwd", "\u00e9", "~"]))
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=12)


def deep(n: int) -> str:
    return "[" * n + "]" * n


@st.composite
def yaml_texts(draw) -> bytes:
    """A YAML options file: a mapping of known and unknown keys to hostile values, or raw damage."""
    import yaml

    kind = draw(st.sampled_from(["mapping", "mapping", "alias", "deep", "bytes", "huge"]))
    if kind == "mapping":
        d = draw(st.dictionaries(st.sampled_from(DISTILL_KEYS), json_values, max_size=4))
        return yaml.safe_dump(d, allow_unicode=True).encode()
    if kind == "alias":
        n = draw(st.integers(1, 9))
        lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
        lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, n)]
        return "\n".join(lines).encode()
    if kind == "deep":
        return f"ipc: {deep(draw(st.integers(50, 5000)))}".encode()
    if kind == "huge":
        return f"{draw(st.sampled_from(DISTILL_KEYS))}: {'9' * draw(st.integers(90, 6000))}".encode()
    return draw(st.binary(max_size=200))


@st.composite
def class_maps(draw) -> tuple[str, bytes]:
    if draw(st.booleans()):
        d = draw(st.dictionaries(st.sampled_from(["0", "1", "2", "x"]), json_values, max_size=3))
        text = json.dumps(d) if draw(st.booleans()) else json.dumps(d)[: draw(st.integers(0, 30))]
        return "map.json", text.encode()
    lines = draw(st.lists(st.one_of(
        st.tuples(st.sampled_from(["0", "1", "zzz", "0 0", ""]),
                  st.one_of(st.integers(-5, 10**6).map(str), st.just("9" * 5000), st.text(max_size=5))
                  ).map(" ".join),
        st.text(max_size=20)), max_size=5))
    return "map.txt", "\n".join(lines).encode("utf-8", "replace")


def clean_or_one_line(capsys, argv, out: Path | None = None) -> int:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code in (0, 2), f"exit {code}\n{err}"
    assert "Traceback" not in err, err
    if code == 2:
        errors = [ln for ln in err.splitlines() if "error:" in ln]
        assert len(errors) == 1 and errors[0].startswith("mgd3: error: "), err
        if out is not None:
            assert not (out / "manifest.json").exists()
    return code


def fresh(tmp: Path, name: str) -> Path:
    d = tmp / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


@given(text=yaml_texts())
def test_fuzz_yaml_config(digits_model, tmp_path_factory, capsys, text):
    ws = fresh(tmp_path_factory.getbasetemp() / "fuzz-yaml", "case")
    (ws / "c.yaml").write_bytes(text)
    out = ws / "o"
    clean_or_one_line(capsys, ["distill", "--data", "digits", "--classes", "0", "--ipc", "1", "--steps", "1",
                               "--model", digits_model, "--out", out, "--method", "plain", "--quiet", "--device",
                               "cpu", "--config", ws / "c.yaml"], out)


@given(cm=class_maps())
def test_fuzz_class_map(digits_model, tmp_path_factory, capsys, cm):
    ws = fresh(tmp_path_factory.getbasetemp() / "fuzz-map", "case")
    name, data = cm
    (ws / name).write_bytes(data)
    out = ws / "o"
    clean_or_one_line(capsys, ["distill", "--data", "digits", "--classes", "0", "--ipc", "1", "--steps", "1",
                               "--model", digits_model, "--out", out, "--method", "plain", "--quiet", "--device",
                               "cpu", "--class-map", ws / name], out)


def _set_value(obj, path: list, value):
    """obj with the item at `path` (indices into dicts' keys / lists, modulo their length) replaced."""
    if not path or not isinstance(obj, (dict, list)) or not obj:
        return value
    i, rest = path[0], path[1:]
    if isinstance(obj, dict):
        k = list(obj)[i % len(obj)]
        return {**obj, k: _set_value(obj[k], rest, value)}
    j = i % len(obj)
    return obj[:j] + [_set_value(obj[j], rest, value)] + obj[j + 1:]


@given(path=st.lists(st.integers(0, 50), min_size=1, max_size=4), value=json_values,
       raw=st.sampled_from([None, "deep", "huge", "bytes"]))
def test_fuzz_manifest(base_set, tmp_path_factory, path, value, raw):
    from mgd3.api import load_set

    root = tmp_path_factory.getbasetemp() / "fuzz-manifest" / "set"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(base_set, root)
    m = json.loads((root / "manifest.json").read_text())
    text = json.dumps(_set_value(m, path, value), allow_nan=True)
    if raw == "deep":
        text = text[:-1] + ', "x": ' + deep(3000) + "}"
    elif raw == "huge":
        text = text[:-1] + ', "x": ' + "9" * 5000 + "}"
    elif raw == "bytes":
        text = text[: len(text) // 2] + "\udcff"
    (root / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    try:
        load_set(root)
    except Mgd3Error as e:
        assert "\n" not in str(e)


@given(value=json_values, key=st.sampled_from(["mean", "std", "protocol", "seeds", "references", "set", "format",
                                               "runs", "x"]), raw=st.sampled_from([None, "deep", "huge", "bytes"]))
def test_fuzz_eval_json(base_set, tmp_path_factory, key, value, raw):
    from mgd3.report import read_evals

    root = tmp_path_factory.getbasetemp() / "fuzz-eval" / "set"
    root.mkdir(parents=True, exist_ok=True)
    r = {"format": "mgd3-eval/1", "mean": 50.0, "std": 1.0, "protocol": {"name": "hard"}, "seeds": [0]}
    r[key] = value
    text = json.dumps(r, allow_nan=True)
    if raw == "deep":
        text = text[:-1] + ', "y": ' + deep(3000) + "}"
    elif raw == "huge":
        text = text[:-1] + ', "y": ' + "9" * 5000 + "}"
    (root / "eval.json").write_bytes(text.encode() + (b"\xff" if raw == "bytes" else b""))
    try:
        read_evals(root)
    except Mgd3Error as e:
        assert "\n" not in str(e)


@given(defaults=json_values, where=st.sampled_from(["mgd3.json", "transformer/config.json", "vae/config.json"]),
       key=st.sampled_from(["defaults", "num_layers", "in_channels", "out_channels", "block_out_channels",
                            "sample_size", "x"]))
def test_fuzz_model_json(digits_model, tmp_path_factory, where, key, defaults):
    from mgd3.backends import load_backend

    m = tmp_path_factory.getbasetemp() / "fuzz-model" / "m"
    if m.exists():
        shutil.rmtree(m)
    shutil.copytree(digits_model, m)
    f = m / where
    d = json.loads(f.read_text()) if f.exists() else {}
    d[key] = defaults
    f.write_text(json.dumps(d, allow_nan=True))
    try:
        load_backend(m)
    except Mgd3Error as e:
        assert "\n" not in str(e)


FLAGS = {"evaluate": ["--epochs", "--seeds", "--resolution", "--option", "--arch", "--protocol", "--batch-size",
                      "--out", "--data", "--data-root"],
         "report": ["--out", "--neighbors", "--embedding", "--data", "--max-real-per-class"],
         "convert-ldm": ["--config", "--out", "--labels-from"]}


@given(sub=st.sampled_from(sorted(FLAGS)), data=st.data())
def test_fuzz_argv(base_set, tmp_path_factory, capsys, sub, data):
    """Argument vectors of fast-to-refuse sub-commands: flags with hostile values, in any order."""
    ws = fresh(tmp_path_factory.getbasetemp() / "fuzz-argv", "case")
    values = st.one_of(st.text(max_size=12), st.sampled_from(
        ["nan", "-1", "0", "9" * 5000, "lr=" + deep(3000), "lr=&a [*a]", "/dev/zero", "/proc/self/status",
         str(ws / "o"), str(base_set / "images")]))
    argv = [sub, str(ws / "no-such-set") if sub != "convert-ldm" else str(ws / "none.ckpt")]
    for flag in data.draw(st.lists(st.sampled_from(FLAGS[sub]), max_size=4)):
        argv += [flag, data.draw(values)]
    if sub == "evaluate":
        argv += ["--device", "cpu", "--quiet", "--epochs", "1"]
    code = clean_or_one_line(capsys, argv, ws / "o")
    assert code == 2  # the set or checkpoint does not exist: never a run
