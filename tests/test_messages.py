"""What the CLI says, through the real CLI: argparse's own errors in one line, an unknown data
name said as such, the interrupt line naming the command that resumes, one default per help."""

from __future__ import annotations

import pytest

from conftest import run_cli
from mgd3.cli import main


@pytest.mark.parametrize("argv, words", [
    (["distill", "--data", "fashion-mnist", "--ipc", "ten", "--out", "x"],
     "argument --ipc: invalid int value: 'ten' (see mgd3 distill --help)"),
    (["report", "some-set", "--neighbors", "many"], "argument --neighbors: invalid int value: 'many'"),
    (["distill", "--data", "fashion-mnist", "--out", "x", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["distill", "--out", "x"], "--data is required"),
])
def test_argparse_errors_are_one_line_and_exit_2(argv, words):
    r = run_cli(*argv)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("mgd3: error: ") and words in r.stderr, r.stderr
    assert "usage:" not in r.stderr


def test_unknown_data_is_named_as_unknown_data(tmp_path):
    r = run_cli("distill", "--data", "mnist", "--out", tmp_path / "o", "--quiet")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    line = r.stderr.strip()
    assert line.startswith("mgd3: error: unknown dataset 'mnist'") and "ships no model" not in line
    assert "fashion-mnist" in line and "image folder" in line
    assert not (tmp_path / "o").exists()
    # a real folder with no shipped model still asks for --model
    (tmp_path / "imgs").mkdir()
    r = run_cli("distill", "--data", tmp_path / "imgs", "--out", tmp_path / "o", "--quiet")
    assert r.returncode == 2 and "pass --model PATH" in r.stderr


@pytest.mark.parametrize("command, words", [
    ("distill", "re-running the same command resumes: the finished batches are kept: mgd3 distill "),
    ("report", "to run it again: mgd3 report "),
])
def test_interrupt_names_the_command_to_run_again(command, words, tmp_path, monkeypatch, capsys):
    import mgd3.cli.distill
    import mgd3.report.cli

    def ctrl_c(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(mgd3.cli.distill, "run", ctrl_c)
    monkeypatch.setattr(mgd3.report.cli, "run", ctrl_c)
    out = tmp_path / "my set"
    argv = (["distill", "--data", "fashion-mnist", "--ipc", "2", "--out", str(out)] if command == "distill"
            else ["report", str(out), "--out", str(tmp_path / "r")])
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("mgd3: interrupted; ") and words in err and len(err.splitlines()) == 1
    assert err.endswith(f"'{out}'" if command == "distill" else f"{tmp_path / 'r'}")  # quoted for the shell


def test_help_gives_one_default_per_option():
    r = run_cli("distill", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    start = text.index("--t-stop T_STOP stop guidance")
    entry = text[start:text.index(" --", start + 1)]  # up to the next option
    assert entry.count("default") == 1 and "default None" not in text, entry
