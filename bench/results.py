"""bench/RESULTS.md: each benchmark's --record adds a dated entry at the end of its own section."""
from __future__ import annotations

import os
import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def record(section: str, title: str, body: list[str], path: Path = RESULTS) -> None:
    """Add `### title` and the body lines at the end of `## section`, so runs of one benchmark stay
    together; a section not in the file yet is started at its end."""
    text = path.read_text() if path.exists() else ""
    entry = "\n".join([f"### {title}", "", *body]).rstrip() + "\n"
    head = re.search(rf"^## {re.escape(section)}[ \t]*$", text, re.M)
    if head is None:
        text = f"{text.rstrip()}\n\n## {section}\n\n{entry}"
    else:
        nxt = re.search(r"^## ", text[head.end():], re.M)
        end = len(text) if nxt is None else head.end() + nxt.start()
        text = f"{text[:end].rstrip()}\n\n{entry}" + (f"\n{text[end:]}" if end < len(text) else "")
    path.write_text(text)


def load() -> str:
    """The 1/5/15-minute load averages, for a record's header: on a shared machine absolute rates
    follow the CPU share a bench gets, so each entry says how loaded the box was."""
    return "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())
