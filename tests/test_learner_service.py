"""learner/service.py without Ray: a real embedded Redis stream, the DeepSpeed learner on CPU and
the tiny policy. What the service decides is reported, archived and acknowledged together, and
only once a checkpoint holds the decision."""

from __future__ import annotations

import collections

import pytest
import torch

from kpop.archive import TrajectoryArchive
from kpop.policy.checkpoint import load_checkpoint
from kpop.stream import open_stream
from kpop.trajectory import Trajectory
from kpop.weight_sync import InProcessSync
from learner.service import LearnerService
from train_helpers import small_config


def _group(gid: str, statuses: list[str]) -> list[Trajectory]:
    g = torch.Generator().manual_seed(len(gid) + sum(map(ord, gid)))
    out = []
    for j, status in enumerate(statuses):
        prompt = torch.randint(2, 200, (5,), generator=g).tolist()
        ids = prompt + torch.randint(2, 200, (4 + j,), generator=g).tolist()
        mask = [0] * len(prompt) + [1] * (len(ids) - len(prompt))
        out.append(Trajectory(run_id="svc", task_id=f"{gid}-{j}", env_id="test", group_id=gid, token_ids=ids,
                              logprobs=[-1.0 * m for m in mask], loss_mask=mask,
                              segments=[(len(prompt), len(ids), 0)], reward=float(j % 2), status=status,
                              error="env fault" if status == "failed" else None))
    return out


@pytest.fixture
def service(tmp_path):
    cfg = small_config(tmp_path, "svc", "schedule.max_staleness=0")
    spec, redis = open_stream(cfg.stream, cfg.out_dir)
    svc = LearnerService(cfg, spec, InProcessSync())
    producer = spec.open(consumer="test-producer")
    yield svc, producer, cfg
    svc.close()
    producer.close()
    redis.stop()


def test_decisions_are_reported_archived_and_acked_after_the_checkpoint(service):
    svc, producer, cfg = service
    groups = [_group("a", ["ok"] * 4), _group("b", ["ok"] * 4), _group("c", ["failed"] * 3 + ["ok"])]
    producer.put_many([t for g in groups for t in g])

    report = svc.rl_step(timeout_s=60)
    assert report.metrics is not None and report.metrics["version"] == 1.0
    assert report.settled == {"consumed": 8, "failed": 3, "dropped_small_group": 1}
    assert "task_reward_mean" in report.metrics and "reward_mean" in report.metrics
    # decided, but nothing acknowledged nor archived before a checkpoint holds the decision
    assert producer.backlog() == 12 and TrajectoryArchive(cfg.out_dir).index() == []

    svc.checkpoint({"controller": {}})
    assert producer.backlog() == 0
    rows = TrajectoryArchive(cfg.out_dir).index()
    assert collections.Counter(r["status"] for r in rows) == {"consumed": 8, "failed": 3, "dropped_small_group": 1}

    # nothing to train on: the call reports no step and settles nothing
    assert svc.rl_step(timeout_s=0.5).metrics is None


def test_weights_leave_through_the_weight_sync_and_the_final_policy_is_the_learners(service, tmp_path):
    svc, producer, _ = service
    producer.put_many(_group("a", ["ok"] * 4) + _group("b", ["ok"] * 4))
    svc.rl_step(timeout_s=60)
    handle = svc.publish_weights()
    assert handle.version == svc.version == 1 and not handle.rewind
    published = InProcessSync().receive(handle)
    current, _ = svc.learner.export_weights()
    assert published.keys() == current.keys() and all(torch.equal(published[k], current[k]) for k in current)
    # after a restore the first publish rewinds engines that may hold a newer, lost version
    svc.checkpoint({"controller": {}})
    svc.restore()
    assert [svc.publish_weights().rewind for _ in range(2)] == [True, False]

    out = svc.save_policy(tmp_path / "policy")
    saved = load_checkpoint(out).state_dict()
    assert [k for k in current if not torch.equal(saved[k], current[k])] == []
    assert (tmp_path / "policy" / "tokenizer.json").is_file()


def test_the_archive_keeps_what_the_learner_saw_per_token(service):
    from kpop.algo.losses import TokenDecision, kpop_keep

    svc, producer, cfg = service
    producer.put_many(_group("a", ["ok"] * 4) + _group("b", ["ok"] * 4) + _group("c", ["failed"] * 3 + ["ok"]))
    assert svc.rl_step(timeout_s=60).metrics is not None
    # written under version 0, arriving at version 1 with max_staleness=0: dropped as stale
    producer.put_many(_group("s", ["ok"] * 4))
    assert svc.rl_step(timeout_s=2).settled == {"dropped_stale": 4}
    svc.checkpoint({"controller": {}})
    recs = {r.trajectory.task_id: r for r in TrajectoryArchive(cfg.out_dir).records()}
    for name in ("a-0", "a-3", "b-1"):
        r, t = recs[name], recs[name].trajectory
        assert r.status == "consumed" and len(r.train_logprobs) == len(r.decisions) == t.num_tokens
        keep = kpop_keep(torch.tensor(r.train_logprobs), torch.tensor(t.logprobs), cfg.algorithm.kpop_phi).tolist()
        assert r.decisions == [(TokenDecision.KEEP if k else TokenDecision.MASK_KL) if m else TokenDecision.NOT_TRAINED
                               for k, m in zip(keep, t.loss_mask)]
        assert r.route_flips is None  # these records carry no routes
    for name in ("c-0", "c-3"):  # failed; its group then too small
        assert recs[name].train_logprobs is None and set(recs[name].decisions) == {TokenDecision.NOT_TRAINED}
    stale, t = recs["s-2"], recs["s-2"].trajectory
    assert stale.status == "dropped_stale"
    assert stale.decisions == [TokenDecision.MASK_STALE if m else TokenDecision.NOT_TRAINED for m in t.loss_mask]
    # offline, at the run's own phi, `kpop replay --rescore` finds exactly the tokens the learner masked
    from kpop.replay import rescore_path

    report = rescore_path(cfg.out_dir, [cfg.algorithm.kpop_phi])
    assert report.trajectories == 8 and report.without_train_logprobs == 8  # 4 failed / small group, 4 stale
    assert report.settings[0].masked == report.archived.get("MASK_KL", 0)
    assert sum(report.archived.values()) == report.tokens
