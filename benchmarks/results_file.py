"""Append one run's section to a committed results file (benchmarks/results/*.md), shared by the
benchmark scripts that accumulate sections (cross_arch, model_diagnosis, plain_vs_mgd3)."""

from __future__ import annotations

from pathlib import Path


def append_section(out: str | Path, title: str, lines: list[str], note: str | None = None) -> None:
    """Append `lines` (and `note`, a paragraph after them) to `out`, which starts with `# title`
    when new; print the section."""
    lines = lines + (["", note] if note else [])
    out = Path(out)
    old = out.read_text() if out.is_file() else f"# {title}\n\n"
    out.write_text(old + "\n".join(lines) + "\n\n")
    print("\n".join(lines))
