"""The trajectory stream: rollout workers -> Redis Stream -> learner consumer group.

    stream = TrajectoryStream(url, consumer="learner-0")
    stream.put(traj)                          # producer (blocks while the backlog is full)
    for entry_id, traj in stream.get(16):     # consumer
        train_on(traj)
    stream.ack([entry_id for entry_id, _ in batch])   # only after the update used them

Guarantees, and how:
- at-least-once delivery: entries stay pending in the group until `ack`; entries of a crashed
  consumer are taken over with XCLAIM (`claim_stale`, also run by `get` every
  `claim_idle_ms / 2`): all of them at once, CLAIM_BATCH ids per round trip, into this
  consumer's pending list, from which `get` then delivers them n at a time; a restarted consumer
  first re-reads its own pending entries.
- never train twice: `ack` adds the trajectory ids to the persistent set `<key>:seen` in the
  same MULTI as XACK, so a re-delivered copy (a claim race, a producer retry that had in
  fact reached Redis, a restarted learner) is recognised in `get` and acked, not returned.
- bounded memory and backpressure: acked entries are deleted (XDEL), so XLEN is exactly the
  backlog of unacknowledged trajectories; `put` waits, with exponential backoff, while it is
  above `max_backlog` and raises `BackpressureTimeout` after `backpressure_timeout_s`.
  (XDEL assumes this group is the stream's only reader, which is the KPop design.)
- connection loss: every call retries with exponential backoff for up to `retry_max_s`,
  then raises `StreamUnavailable`.
- hostile or undecodable entries (any bytes in any field) are moved to the dead-letter stream
  `<key>:dead` with the reason, and acked: the entries behind them still flow.

Entries are `{"id": trajectory_id, "d": encode(traj)}`: the id is readable without decoding.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kpop.config import StreamConfig
from kpop.redis_server import EmbeddedRedis, connect, redact
from kpop.trajectory import Trajectory, TrajectoryDecodeError, decode, encode

log = logging.getLogger(__name__)
R = TypeVar("R")

Entry = tuple[str, Trajectory]
CLAIM_BATCH = 1000  # ids per XCLAIM: ownership moves without the payloads (JUSTID), so it is cheap


class StreamUnavailable(ConnectionError):
    """Redis stayed unreachable for longer than retry_max_s."""


class BackpressureTimeout(TimeoutError):
    """The backlog stayed above max_backlog for longer than the producer's timeout."""


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class TrajectoryStream:
    """One process's handle on the stream: producer (`put*`), consumer (`get`/`ack`), or both."""

    def __init__(
        self,
        url: str,
        key: str = "kpop:trajectories",
        group: str = "learner",
        consumer: str | None = None,
        *,
        max_backlog: int = 1024,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        retry_max_s: float = 30.0,
        backpressure_timeout_s: float | None = 600.0,
    ) -> None:
        if max_backlog < 1:
            raise ValueError(f"max_backlog must be >= 1, got {max_backlog}")
        if not key or not group:
            raise ValueError("stream key and group must be non-empty")
        self.url = url
        self.key = key
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.max_backlog = max_backlog
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.retry_max_s = retry_max_s
        self.backpressure_timeout_s = backpressure_timeout_s
        self.seen_key = f"{key}:seen"
        self.dead_key = f"{key}:dead"
        # retries are ours (_call), bounded by retry_max_s; redis-py's own would stack on top
        self._redis = connect(url, retry=Retry(NoBackoff(), 0))
        self._backlog = 0  # XLEN seen by the last put; avoids a round trip per put when low
        self._inflight: dict[str, str] = {}  # entry id -> trajectory id, delivered and not acked
        self._group_ready = False
        self._pel_cursor: str | None = "0"  # re-read our own pending list first (restart, lost reply)
        self._last_claim = 0.0

    # ---- plumbing -------------------------------------------------------------------------

    def _call(self, fn: Callable[[], R]) -> R:
        """Run fn, retrying connection failures with exponential backoff up to retry_max_s."""
        deadline = time.monotonic() + self.retry_max_s
        delay = 0.05
        nogroup = 0
        while True:
            try:
                if not self._group_ready:
                    self._ensure_group()
                return fn()
            except redis.AuthenticationError:
                raise  # a ConnectionError subclass in redis-py, but retrying cannot fix a password
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                if time.monotonic() + delay > deadline:
                    raise StreamUnavailable(
                        f"redis at {redact(self.url)} unreachable for {self.retry_max_s:.0f} s: {exc}"
                    ) from exc
                log.warning("redis %s: %s; retrying in %.2f s", redact(self.url), exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                # a reply may have been lost after Redis delivered entries to us
                self._pel_cursor = "0"
            except redis.ResponseError as exc:
                nogroup += 1
                if "NOGROUP" not in str(exc) or nogroup > 3:
                    raise
                self._group_ready = False  # the stream vanished (server without persistence)

    def _ensure_group(self) -> None:
        try:
            self._redis.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def close(self) -> None:
        self._redis.close()

    def __enter__(self) -> "TrajectoryStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- producer -------------------------------------------------------------------------

    def put(self, traj: Trajectory) -> str:
        """Append one trajectory; returns its entry id. Blocks while the backlog is full."""
        return self.put_many([traj])[0]

    def put_many(self, trajs: Iterable[Trajectory]) -> list[str]:
        """Append trajectories in one pipelined round trip; returns their entry ids."""
        entries = [(t.trajectory_id, encode(t)) for t in trajs]
        if not entries:
            return []
        self._wait_for_room()

        def send() -> list:
            pipe = self._redis.pipeline(transaction=False)
            for tid, data in entries:  # execute_command: skips xadd()'s per-call argument handling
                pipe.execute_command("XADD", self.key, "*", "id", tid, "d", data)
            pipe.execute_command("XLEN", self.key)
            return pipe.execute()

        *ids, self._backlog = self._call(send)
        return [_s(i) for i in ids]

    def _wait_for_room(self) -> None:
        if self._backlog < self.max_backlog:
            return
        start = time.monotonic()
        delay = 0.005
        while True:
            self._backlog = self._call(lambda: self._redis.xlen(self.key))
            if self._backlog < self.max_backlog:
                return
            waited = time.monotonic() - start
            if self.backpressure_timeout_s is not None and waited > self.backpressure_timeout_s:
                raise BackpressureTimeout(
                    f"stream {self.key!r} backlog {self._backlog} >= max_backlog {self.max_backlog} "
                    f"for {waited:.1f} s: is the learner consuming?"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def backlog(self) -> int:
        """Entries written and not yet acknowledged (pending or not yet delivered)."""
        return self._call(lambda: self._redis.xlen(self.key))

    # ---- consumer -------------------------------------------------------------------------

    def get(self, n: int = 1, block_ms: int | None = None) -> list[Entry]:
        """Up to n trajectories never acked before: stale ones claimed from crashed consumers, then
        our own unacked ones (after a restart or a lost reply), then new ones. Waits up to
        block_ms (default: the stream's) only when there is nothing at all; 0 = do not wait."""
        if n < 1:
            raise ValueError(f"get(n): n must be >= 1, got {n}")
        block = self.block_ms if block_ms is None else block_ms
        if self.claim_idle_ms and time.monotonic() - self._last_claim > self.claim_idle_ms / 2000:
            self._claim_all(self.claim_idle_ms)
        out: list[Entry] = []
        while self._pel_cursor is not None and len(out) < n:
            out += self._read_own_pending(n - len(out))
        if len(out) < n:
            out += self._read_new(n - len(out))
        if not out and block:
            out += self._accept(self._xreadgroup(">", n, block))
        return out

    def _read_new(self, count: int) -> list[Entry]:
        """New entries (the hot path of the learner); `_accept` checks their seen-flags.
        Two round trips on purpose: a Lua script doing both in one copied every payload twice
        inside redis-server (2x its CPU per 4 KiB entry, 2.5x per 64 KiB: bench/RESULTS.md)."""
        return self._accept(self._xreadgroup(">", count, None))

    def _xreadgroup(self, start: str, count: int, block: int | None) -> list:
        def read() -> list:
            reply = self._redis.xreadgroup(self.group, self.consumer, {self.key: start}, count=count, block=block)
            return reply[0][1] if reply else []

        return self._call(read)

    def _read_own_pending(self, count: int) -> list[Entry]:
        """Entries Redis delivered to this consumer name earlier but that nobody acked."""
        raw = self._xreadgroup(self._pel_cursor, count, None)
        if not raw:
            self._pel_cursor = None  # our pending list is drained; from now on only new entries
            return []
        self._pel_cursor = _s(raw[-1][0])
        return self._accept([e for e in raw if _s(e[0]) not in self._inflight])

    def claim_stale(self, min_idle_ms: int | None = None, count: int = 100) -> list[Entry]:
        """Take over every entry other consumers left pending longer than min_idle_ms; return up to
        `count` of this consumer's pending entries (the rest come with the next `get` calls)."""
        self._claim_all(self.claim_idle_ms if min_idle_ms is None else min_idle_ms)
        out: list[Entry] = []
        while self._pel_cursor is not None and len(out) < count:
            out += self._read_own_pending(count - len(out))
        return out

    def _claim_all(self, min_idle_ms: int) -> None:
        """Move every idle pending entry of the group to this consumer, CLAIM_BATCH ids per round
        trip, until none is left: a consumer that comes back under a new name gets its
        predecessor's whole backlog at once, not one batch per claim interval. (XPENDING IDLE +
        XCLAIM JUSTID rather than XAUTOCLAIM JUSTID, whose cursor redis-py drops.)"""
        self._last_claim = time.monotonic()
        start, claimed = "-", False
        while True:
            rows = self._call(lambda: self._redis.xpending_range(
                self.key, self.group, min=start, max="+", count=CLAIM_BATCH, idle=min_idle_ms))
            ids = [r["message_id"] for r in rows]
            if ids:
                self._call(lambda: self._redis.xclaim(self.key, self.group, self.consumer, min_idle_ms, ids,
                                                      justid=True))
                claimed = True
            if len(ids) < CLAIM_BATCH:
                break
            start = "(" + _s(ids[-1])  # exclusive: after the last one listed
        if claimed:
            self._pel_cursor = "0"  # deliver them from our own pending list

    def _accept(self, raw: list) -> list[Entry]:
        """Decode entries; ack duplicates and dead-letter garbage instead of returning them.

        Entries are untrusted (anything with the password can XADD): every field is read inside
        a guard, and a malformed entry is dead-lettered with its reason and acked, so one bad
        record never stops the consumer or holds up the good ones behind it."""
        if not raw:
            return []
        drop: list[str] = []  # duplicates and deleted entries: ack + delete right away
        dead: list[tuple[str, dict, str]] = []
        candidates: list[tuple[str, str, dict]] = []
        for eid, fields in raw:
            eid = _s(eid)  # generated by Redis: always ASCII
            if not fields:  # deleted while pending: nothing left to use
                drop.append(eid)
                continue
            tid = fields.get(b"id")
            if not isinstance(tid, bytes) or not tid:
                dead.append((eid, fields, "the entry has no 'id' field"))
                continue
            try:
                candidates.append((eid, tid.decode("utf-8"), fields))
            except UnicodeDecodeError:
                dead.append((eid, fields, f"the entry's 'id' field {tid[:64]!r} is not UTF-8"))
        seen = self._call(lambda: self._redis.smismember(self.seen_key, [t for _, t, _ in candidates])) \
            if candidates else []
        batch_tids = set(self._inflight.values())
        out: list[Entry] = []
        for (eid, tid, fields), was_seen in zip(candidates, seen):
            if was_seen or tid in batch_tids:
                log.info("duplicate delivery of trajectory %s (entry %s): acked, not returned", tid, eid)
                drop.append(eid)
                continue
            try:
                if b"d" not in fields:
                    raise TrajectoryDecodeError("the entry has no 'd' (data) field")
                traj = decode(fields[b"d"])
                if traj.trajectory_id != tid:
                    raise TrajectoryDecodeError(f"entry id field {tid!r} != trajectory_id {traj.trajectory_id!r}")
            except Exception as exc:  # noqa: BLE001 -- whatever the bytes hold, the consumer goes on
                error = f"{type(exc).__name__}: {exc}"
                log.error("dead-lettering stream entry %s: %s", eid, error)
                dead.append((eid, fields, error))
                continue
            batch_tids.add(tid)
            self._inflight[eid] = tid
            out.append((eid, traj))
        if drop or dead:
            self._drop(drop, dead)
        return out

    def _drop(self, drop: list[str], dead: list[tuple[str, dict, str]]) -> None:
        def run() -> None:
            pipe = self._redis.pipeline(transaction=True)
            for eid, fields, error in dead:
                pipe.xadd(self.dead_key, {**fields, b"entry": eid, b"error": error, b"consumer": self.consumer})
            gone = drop + [eid for eid, _, _ in dead]
            pipe.xack(self.key, self.group, *gone)
            pipe.xdel(self.key, *gone)
            pipe.execute()

        self._call(run)

    def ack(self, entry_ids: Iterable[str]) -> None:
        """Mark delivered entries as used: never delivered for training again."""
        entry_ids = list(entry_ids)
        if not entry_ids:
            return
        unknown = [e for e in entry_ids if e not in self._inflight]
        if unknown:
            raise ValueError(f"ack of entries not delivered to consumer {self.consumer!r} (or acked twice): {unknown[:5]}")
        tids = [self._inflight[e] for e in entry_ids]

        def run() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.sadd(self.seen_key, *tids)
            pipe.xack(self.key, self.group, *entry_ids)
            pipe.xdel(self.key, *entry_ids)
            pipe.execute()

        self._call(run)
        for e in entry_ids:
            del self._inflight[e]

    def pending(self) -> int:
        """Entries delivered to some consumer of the group and not yet acked."""
        return self._call(lambda: self._redis.xpending(self.key, self.group)["pending"])

    def dead_letters(self, count: int = 100) -> list[dict]:
        """The newest dead-lettered entries: {"entry", "error", "consumer", "id", "d"}."""
        rows = self._call(lambda: self._redis.xrevrange(self.dead_key, count=count))
        # a dead letter keeps whatever field names its writer used: show undecodable ones escaped
        return [{k.decode("utf-8", "backslashreplace"): v for k, v in fields.items()} for _, fields in rows]


@dataclass(frozen=True)
class StreamSpec:
    """Everything a process needs to open the run's stream; small and picklable (Ray actors)."""

    url: str
    key: str = "kpop:trajectories"
    group: str = "learner"
    max_backlog: int = 1024
    block_ms: int = 1000
    claim_idle_ms: int = 30_000
    retry_max_s: float = 30.0

    def open(self, consumer: str | None = None) -> TrajectoryStream:
        return TrajectoryStream(
            self.url,
            self.key,
            self.group,
            consumer,
            max_backlog=self.max_backlog,
            block_ms=self.block_ms,
            claim_idle_ms=self.claim_idle_ms,
            retry_max_s=self.retry_max_s,
        )


def open_stream(cfg: StreamConfig, run_dir: str | Path) -> tuple[StreamSpec, EmbeddedRedis | None]:
    """The run's stream from a `StreamConfig`: the configured server, or a fresh embedded one.

    The embedded server keeps its data (AOF) in run_dir/redis, so a resumed run finds the
    backlog and the set of trained trajectory ids where it left them. The caller stops it.
    """
    server = None
    url = cfg.redis_url
    if url is None:
        server = EmbeddedRedis(Path(run_dir) / "redis", appendonly=cfg.appendonly).start()
        url = server.url
    spec = StreamSpec(
        url=url,
        key=cfg.key,
        group=cfg.group,
        max_backlog=cfg.max_backlog,
        block_ms=cfg.block_ms,
        claim_idle_ms=cfg.claim_idle_ms,
        retry_max_s=cfg.retry_max_s,
    )
    return spec, server
