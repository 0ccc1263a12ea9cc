"""The parquet trajectory archive: round trip, index, filters, crash safety, resume."""

from __future__ import annotations

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kpop.archive import ArchiveError, TrajectoryArchive, archive_dir
from kpop.trajectory import Segment, Trajectory
from demo_run import play


def _traj(i: int, env: str = "kpop/tooluse-v0", versions: tuple[int, ...] = (3, 4), reward: float = 0.5,
          status: str = "ok") -> Trajectory:
    rng = random.Random(i)
    n = 12
    mask = [0] * 4 + [1] * 3 + [0] * 2 + [1] * 3
    # logprobs representable in float32, as the wire format stores them
    lps = [float(-rng.randint(0, 64) / 16) if m else 0.0 for m in mask]
    return Trajectory(run_id="r", task_id=f"t{i}", env_id=env, env_kwargs={"difficulty": i % 3}, seed=i,
                      messages=[{"role": "user", "content": f"q{i} ü"}, {"role": "assistant", "content": "a"}],
                      token_ids=list(range(i, i + n)), logprobs=lps, loss_mask=mask,
                      segments=[Segment(4, 7, versions[0]), Segment(9, 12, versions[-1])], reward=reward,
                      reward_detail={"x": [1, 2]}, status=status, error="boom" if status == "failed" else None,
                      timings={"wall_s": 0.5})


def test_round_trip_index_and_filters(tmp_path):
    a = TrajectoryArchive(tmp_path, flush_every=3)
    ts = [_traj(i, reward=i / 10) for i in range(5)]
    a.write(ts[:2], status="consumed", step=5, policy_version=6, train_logprobs=[[-0.25] * 12, None])
    assert a.parts() == []  # buffered below flush_every
    a.write(ts[2:4], status="dropped_stale", step=6, policy_version=9)
    assert len(a.parts()) == 1  # 4 rows >= 3: flushed as one part
    a.write([ts[4]], status="failed", step=None, policy_version=None)
    a.close()
    assert [p.name for p in a.parts()] == ["part-000000.parquet", "part-000001.parquet"]

    b = TrajectoryArchive(tmp_path)
    assert b.load() == ts  # every field survives, in write order
    idx = b.index()
    assert [r["trajectory_id"] for r in idx] == [t.trajectory_id for t in ts]
    assert idx[0]["staleness"] == 3 and idx[2]["staleness"] == 6 and idx[4]["staleness"] is None
    assert idx[0]["min_version"] == 3 and idx[0]["max_version"] == 4 and idx[0]["num_tokens"] == 12
    assert [r.trajectory_id for r in b.load(status="dropped_stale")] == [ts[2].trajectory_id, ts[3].trajectory_id]
    assert [r.task_id for r in b.load(min_reward=0.25, max_staleness=5)] == ["t4"]  # t4: staleness unknown
    assert [r.task_id for r in b.load(min_reward=0.15)] == ["t2", "t3", "t4"]
    assert [r["task_id"] for r in b.index(failed=True)] == ["t4"]
    recs = b.records(ids=[ts[1].trajectory_id, ts[0].trajectory_id])
    assert [r.trajectory.task_id for r in recs] == ["t0", "t1"]
    assert recs[0].train_logprobs == [-0.25] * 12 and recs[1].train_logprobs is None
    assert recs[0].status == "consumed" and recs[0].step == 5 and recs[0].policy_version == 6

    # columnar: token arrays are list columns, messages JSON strings
    table = pq.read_table(b.parts()[0])
    token_type = table.schema.field("token_ids").type
    assert pa.types.is_list(token_type) and token_type.value_type == pa.int32()
    assert json.loads(table.column("messages")[0].as_py())[0]["content"] == "q0 ü"


def test_resume_continues_numbering_and_repairs_a_crashed_writer(tmp_path):
    with TrajectoryArchive(tmp_path) as a:
        a.write([_traj(0)], status="consumed", step=0, policy_version=0)
    adir = archive_dir(tmp_path)
    # a writer that crashed: a half-written temp file, and a part whose index was never published
    (adir / ".tmp-dead.parquet").write_bytes(b"PAR1 half")
    os.utime(adir / ".tmp-dead.parquet", (0, 0))
    with TrajectoryArchive(tmp_path) as a:
        a.write([_traj(1)], status="consumed", step=1, policy_version=1)
    (adir / "part-000001.index.json").unlink()

    c = TrajectoryArchive(tmp_path)  # a resumed run
    assert not (adir / ".tmp-dead.parquet").exists()
    assert (adir / "part-000001.index.json").exists()  # rebuilt from the part
    c.write([_traj(2)], status="consumed", step=2, policy_version=2)
    c.close()
    assert [p.name for p in c.parts()] == [f"part-00000{i}.parquet" for i in range(3)]
    assert [t.task_id for t in c.load()] == ["t0", "t1", "t2"]


def test_a_taken_part_number_is_never_overwritten(tmp_path):
    a, b = TrajectoryArchive(tmp_path), TrajectoryArchive(tmp_path)  # two writers, same next number
    a.write([_traj(0)], status="consumed")
    b.write([_traj(1)], status="consumed")
    a.close()
    b.close()
    assert sorted(t.task_id for t in TrajectoryArchive(tmp_path).load()) == ["t0", "t1"]


def test_real_episodes_round_trip(tmp_path):
    trajs = [play("kpop/tooluse-v0", "oracle", 3), play("kpop/workflow-v0", "wrong", 4)]
    with TrajectoryArchive(tmp_path) as a:
        a.write(trajs, status="consumed", step=0, policy_version=0)
    back = TrajectoryArchive(tmp_path).load()
    assert back == trajs
    assert back[0].reward == 1.0 and back[1].reward == 0.0
    assert any(m.get("tool_calls") for m in back[0].messages)


def test_bad_input_is_named(tmp_path):
    a = TrajectoryArchive(tmp_path)
    with pytest.raises(ArchiveError, match="status must be one of"):
        a.write([_traj(0)], status="eaten")
    with pytest.raises(ArchiveError, match=r"train_logprobs\[0\] has 3 values for 12 tokens"):
        a.write([_traj(0)], status="consumed", train_logprobs=[[0.0] * 3])
    with pytest.raises(ArchiveError, match="not a kpop.trajectory.Trajectory"):
        a.write([{"task_id": "x"}], status="consumed")  # type: ignore[list-item]
    with pytest.raises(ArchiveError, match="policy_version must be an int"):
        a.write([_traj(0)], status="consumed", policy_version=-1)
    with pytest.raises(ArchiveError, match="not a run directory"):
        archive_dir(tmp_path / "nowhere")
    a.close()
    with pytest.raises(ArchiveError, match="closed"):
        a.write([_traj(0)], status="consumed")


def test_a_corrupt_index_is_rebuilt_from_its_part(tmp_path):
    with TrajectoryArchive(tmp_path) as archive:
        archive.write([_traj(i) for i in range(3)], status="consumed", step=1)
    index = next((tmp_path / "trajectories").glob("*.index.json"))
    for text in ("{not json", '{"rows": [{"trajectory_id": "x"}]}', '{"rows": 7}', "[]"):
        index.write_text(text)
        assert len(TrajectoryArchive(tmp_path).load()) == 3, text
