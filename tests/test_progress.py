"""Progress of the long phases (kpop.metrics.Progress) and SFT run in chunks (learner/service.py):
plain periodic log lines where nobody watches a terminal, a bar where someone does, and SFT
metrics rows that reach metrics.jsonl while the phase is still running."""

from __future__ import annotations

import io
import logging
import os
import select
import sys

import pytest

from kpop.metrics import MetricsWriter, Progress, read_metrics


class FakeClock:
    """Seconds that pass only when the test says so: the rate rules are tested, not the machine."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def no_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys, "stderr", io.StringIO())


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kpop.train"]


def _run(clock: FakeClock, seconds_per_step: float, total: int = 100, **kw) -> None:
    with Progress("sft", total, clock=clock, **kw) as progress:
        for done in range(1, total + 1):
            clock.now += seconds_per_step
            progress.update(done, f"loss {1.0 / done:.3f}")


def test_a_non_terminal_gets_plain_lines_every_10_s_or_5_percent_whichever_is_rarer(no_terminal, caplog):
    caplog.set_level(logging.INFO, logger="kpop.train")
    _run(FakeClock(), seconds_per_step=1.0)  # 10 s is the rarer: a line every 10 steps
    lines = _lines(caplog)
    assert [line.split()[1] for line in lines] == [f"{n}/100" for n in range(10, 101, 10)]
    assert lines[1] == "sft 20/100 loss 0.050 (20%, 0:20 elapsed, ~1:20 left)"
    assert lines[-1] == "sft 100/100 loss 0.010 (100%, 1:40 elapsed)"

    caplog.clear()
    _run(FakeClock(), seconds_per_step=20.0)  # 5% is the rarer: a line every 5 steps
    assert [line.split()[1] for line in _lines(caplog)] == [f"{n}/100" for n in range(5, 101, 5)]


def test_the_last_step_is_always_reported_once_and_bar_false_means_plain_lines(no_terminal, caplog):
    caplog.set_level(logging.INFO, logger="kpop.train")
    clock = FakeClock()
    with Progress("eval before_rl", 7, bar=False, clock=clock) as progress:
        progress.update(3)  # too soon for a line
        progress.update(7, "episodes")
        progress.update(7, "episodes")  # a repeat of the end is not a second line
    assert _lines(caplog) == ["eval before_rl 7/7 episodes (100%, 0:00 elapsed)"]


def test_a_terminal_gets_a_bar_and_no_log_lines(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="kpop.train")
    master, replica = os.openpty()
    tty = os.fdopen(replica, "w")
    monkeypatch.setattr(sys, "stdout", tty)
    monkeypatch.setattr(sys, "stderr", tty)
    try:
        with Progress("rl", 4) as progress:
            assert progress.use_bar
            for done in range(1, 5):
                progress.update(done, "reward 0.5")
        tty.flush()
        chunks = []  # a pty hands over what was written in pieces: read until it stays quiet
        while select.select([master], [], [], 1.0)[0]:
            chunks.append(os.read(master, 65536))
        drawn = b"".join(chunks).decode(errors="replace")
    finally:
        tty.close()
        os.close(master)
    assert "rl" in drawn and "4/4" in drawn and "reward 0.5" in drawn
    assert _lines(caplog) == []
    # the same terminal with the bar switched off (logging.progress: false) gets plain lines
    assert not Progress("rl", 4, bar=False).use_bar


# -- SFT in chunks -------------------------------------------------------------------------------

def _service(tmp_path, name: str):
    from kpop.stream import open_stream
    from kpop.weight_sync import InProcessSync
    from learner.service import LearnerService
    from train_helpers import small_config

    cfg = small_config(tmp_path, name)
    spec, redis = open_stream(cfg.stream, cfg.out_dir)
    return LearnerService(cfg, spec, InProcessSync()), redis, cfg


def test_sft_rows_are_written_as_the_phase_runs_and_chunks_train_on_the_same_batches(tmp_path):
    from kpop.sft import collect_demos

    chunked, redis_a, cfg = _service(tmp_path, "chunked")
    whole, redis_b, _ = _service(tmp_path, "whole")
    try:
        demos = collect_demos(cfg.environments.train, 16, chunked.tokenizer, seed=0)
        writer = MetricsWriter(cfg.out_dir, tensorboard=False)
        got: list[dict] = []
        for start, stop in [(0, 2), (2, 3), (3, 5)]:
            rows = chunked.sft(demos, start, stop, batch_size=4, seed=7)
            for i, row in enumerate(rows, start):
                writer.log(i, row, phase="sft")
            got += rows
            # the rows so far are on disk before the phase has ended
            assert [r["step"] for r in read_metrics(cfg.out_dir, phase="sft")] == list(range(stop))
        writer.close()
        once = whole.sft(demos, 0, 5, batch_size=4, seed=7)
        assert [r["sft_loss"] for r in got] == pytest.approx([r["sft_loss"] for r in once], rel=1e-6)
        assert got[-1]["sft_loss"] < got[0]["sft_loss"]  # it trains
        assert chunked.learner.sft_steps == 5
        with pytest.raises(ValueError, match="3..1"):
            chunked.sft(demos, 3, 1, batch_size=4, seed=7)
    finally:
        for svc, redis in ((chunked, redis_a), (whole, redis_b)):
            svc.close()
            redis.stop()
