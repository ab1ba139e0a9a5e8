"""Replace one ``## `` section of docs/benchmarks.md, keeping the others (bench scripts that
measure one thing write only their own section)."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_section(head: str, section: str, *, before: str | None = None, path: Path = BENCHMARKS_MD) -> None:
    """Put ``section`` (starting with ``head``) in place of the section that starts with ``head``;
    when there is none, insert it before the section ``before`` (or append it)."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    section = section.rstrip("\n") + "\n"
    if head in text:
        start = text.index(head)
        end = text.find("\n## ", start + len(head))
        text = text[:start] + section + (text[end:] if end != -1 else "")
    elif before is not None and before in text:
        at = text.index(before)
        text = text[:at] + section + "\n" + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
