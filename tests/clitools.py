"""Helpers for tests that run the real CLI in-process (`mgd3.cli.main`), as a user would."""

from __future__ import annotations

from pathlib import Path

from mgd3.cli import main


def refused(capsys, argv, msg: str | None = None, out=None) -> str:
    """Run `mgd3 argv`; assert exit 2 and exactly one `mgd3: error:` line (containing `msg`) and
    no manifest.json in `out`; returns the line. A traceback fails the test by itself."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}\n{err}"
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("mgd3: error: "), err
    if msg is not None:
        assert msg in errors[0], errors[0]
    if out is not None:
        assert not (Path(out) / "manifest.json").exists()
    return errors[0]


def ok(capsys, argv) -> str:
    """Run `mgd3 argv`; assert exit 0; returns stdout."""
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    return cap.out
