"""bench/results.py: a benchmark's --record lands at the end of its own section of RESULTS.md."""
from __future__ import annotations

from bench.results import record


def test_record_goes_to_the_end_of_its_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# results\n\n## engine\n\nold run\n\n## async_vs_sync\n\nasync run\n")
    record("engine", "2026-11-29 12:37 UTC", ["| a | b |", "", "speedup 5.85"], path)
    record("stream", "2026-11-29 13:00 UTC", ["ratio 0.2"], path)
    text = path.read_text()
    assert text.index("old run") < text.index("### 2026-11-29 12:37 UTC") < text.index("speedup 5.85") < text.index("## async_vs_sync")
    assert text.index("async run") < text.index("## stream") < text.index("### 2026-11-29 13:00 UTC") < text.index("ratio 0.2")
    assert text.count("## engine\n") == 1 and text.endswith("ratio 0.2\n")
    record("async_vs_sync", "later", ["x"], path)  # a middle section again: before the next one
    text = path.read_text()
    assert text.index("async run") < text.index("### later") < text.index("## stream")
