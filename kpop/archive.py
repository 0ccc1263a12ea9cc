"""Every trajectory a run produced, kept in the run directory as parquet, with an index.

    archive = TrajectoryArchive("runs/demo")
    archive.write(trajs, status="consumed", step=12, policy_version=12)
    archive.close()                                    # flushes what is buffered
    TrajectoryArchive("runs/demo").load(env_id="kpop/tooluse-v0", min_reward=1.0)

Layout of `runs/<name>/trajectories/`:

    part-000000.parquet          one row per trajectory (columns in `_SCHEMA`)
    part-000000.index.json       the index rows of that part (`IndexRow`), small
    ...

Crash safety: a part and its index are each written to a temporary name and then linked to
their final name, so a reader (or a resumed writer) only ever sees complete files. A crash
between the two leaves a part without an index; opening the archive rebuilds that index from
the part. Linking (not renaming) means a second writer can never overwrite a part: it takes the
next free number instead. Reopening after a resume continues the numbering.

A part that cannot be read (truncated by a full disk, corrupted in a copy) does not make the
rest unreadable: readers skip it with a warning and list it in `TrajectoryArchive.skipped`.

Archive status (`ArchiveStatus`: why the trajectory was kept) is separate from the episode's own
status (`kpop.trajectory.TrajectoryStatus`: ok | failed | truncated).

What the learner saw per token is optional per row, aligned with `token_ids` (None in rows written
without it, and in parts written before it existed):
  train_logprobs  the learner's own logprob of each token (0.0 for the first token: nothing predicts it)
  decisions       what the loss did with each token (`kpop.algo.losses.TokenDecision` values)
  route_flips     per token a bitmask over the policy's MoE layers (bit l: the l-th MoE layer of the
                  main stack, the routes' layer axis): set when the learner's router would choose a
                  different top-k expert set for that token than the rollout recorded. Stored as
                  packed little-endian bytes, a fixed width per row (Ring-2.6 has more than 64 MoE
                  layers, more than an int64 holds).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from kpop.trajectory import ArchiveStatus, Segment, Trajectory, TrajectoryStatus

# TokenDecision values (kpop.algo.losses, which imports torch: the archive's readers need none)
DECISION_VALUES = range(5)

STATUSES: tuple[str, ...] = tuple(ArchiveStatus)
EPISODE_STATUSES: tuple[str, ...] = tuple(TrajectoryStatus)
log = logging.getLogger(__name__)
ARCHIVE_DIR = "trajectories"
FORMAT_VERSION = 1

_PART_RE = re.compile(r"part-(\d{6})\.parquet")

_SCHEMA = pa.schema([
    ("trajectory_id", pa.string()),
    ("run_id", pa.string()),
    ("group_id", pa.string()),
    ("env_id", pa.string()),
    ("env_kwargs", pa.string()),  # JSON; absent from parts written before it existed
    ("task_id", pa.string()),
    ("seed", pa.int64()),
    ("status", pa.string()),  # archive status
    ("step", pa.int64()),  # learner step at archiving time
    ("policy_version", pa.int64()),  # learner's policy version at archiving time
    ("min_version", pa.int64()),
    ("max_version", pa.int64()),
    ("staleness", pa.int64()),  # policy_version - min_version
    ("reward", pa.float64()),
    ("reward_detail", pa.string()),  # JSON
    ("episode_status", pa.string()),  # Trajectory.status (TrajectoryStatus)
    ("error", pa.string()),
    ("messages", pa.string()),  # JSON: the OpenAI chat messages
    ("token_ids", pa.list_(pa.int32())),
    ("logprobs", pa.list_(pa.float32())),
    ("loss_mask", pa.list_(pa.int8())),
    ("train_logprobs", pa.list_(pa.float32())),  # null unless the learner recomputed them
    ("decisions", pa.list_(pa.int8())),  # TokenDecision per token, or null
    ("route_flips", pa.binary()),  # per token a little-endian bitmask of route_flip_bytes bytes, or null
    ("route_flip_bytes", pa.int32()),
    ("segments", pa.list_(pa.list_(pa.int64()))),  # [start, end, version]
    ("timings", pa.string()),  # JSON
    ("sandbox", pa.string()),  # JSON or null
    ("created_at", pa.float64()),
    ("archived_at", pa.float64()),
])
# The index keeps what filters need without opening the parts.
INDEX_FIELDS: tuple[str, ...] = ("trajectory_id", "env_id", "task_id", "seed", "reward", "status",
                                 "episode_status", "step", "policy_version", "min_version", "max_version",
                                 "staleness", "num_tokens", "num_turns", "created_at")


class ArchiveError(ValueError):
    """An archive that cannot be read or a bad write; the message names the file or field."""


@dataclass
class ArchivedTrajectory:
    """One archive row: the trajectory plus what the run knew when it was archived."""

    trajectory: Trajectory
    status: str
    step: int | None
    policy_version: int | None
    staleness: int | None
    train_logprobs: list[float] | None
    part: str
    decisions: list[int] | None = None  # TokenDecision per token
    route_flips: list[int] | None = None  # per token, bitmask over MoE layers (see the module docstring)


def archive_dir(path: str | Path) -> Path:
    """`path` may be a run directory or its `trajectories/` folder."""
    path = Path(path)
    if path.name != ARCHIVE_DIR and (path / ARCHIVE_DIR).is_dir():
        return path / ARCHIVE_DIR
    if path.is_dir() and (any(path.glob("part-*.parquet")) or path.name == ARCHIVE_DIR):
        return path
    raise ArchiveError(f"{path}: not a run directory or trajectory archive (no {ARCHIVE_DIR}/ with part-*.parquet)")


class TrajectoryArchive:
    """Append-only parquet archive of a run's trajectories (see the module docstring)."""

    def __init__(self, run_dir: str | Path, flush_every: int = 256) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        run_dir = Path(run_dir)
        self.dir = run_dir if run_dir.name == ARCHIVE_DIR else run_dir / ARCHIVE_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self._buffer: list[dict[str, Any]] = []
        self._closed = False
        self.skipped: dict[str, str] = {}  # part file name -> why it could not be read
        self._repair()

    # ---- writing ------------------------------------------------------------------------------
    def write(self, trajectories: Iterable[Trajectory], status: ArchiveStatus, step: int | None = None,
              policy_version: int | None = None,
              train_logprobs: Sequence[Sequence[float] | None] | None = None,
              decisions: Sequence[Sequence[int] | None] | None = None,
              route_flips: Sequence[Sequence[int] | None] | None = None) -> None:
        """Buffer `trajectories`; a part file is written every `flush_every` rows (and on flush/close).
        `train_logprobs`, `decisions`, `route_flips`: one entry (per-token list or None) per trajectory."""
        if self._closed:
            raise ArchiveError("write() on a closed archive")
        if status not in STATUSES:
            raise ArchiveError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        status = ArchiveStatus(status)
        for name, value in (("step", step), ("policy_version", policy_version)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ArchiveError(f"{name} must be an int >= 0 or None, got {value!r}")
        trajectories = list(trajectories)
        per_token = {"train_logprobs": train_logprobs, "decisions": decisions, "route_flips": route_flips}
        for name, values in per_token.items():
            if values is not None and len(values) != len(trajectories):
                raise ArchiveError(f"{name} has {len(values)} entries for {len(trajectories)} trajectories")
        now = time.time()
        rows = []
        for i, traj in enumerate(trajectories):
            if not isinstance(traj, Trajectory):
                raise ArchiveError(f"trajectories[{i}] is a {type(traj).__name__}, not a kpop.trajectory.Trajectory")
            mine = {name: None if values is None else values[i] for name, values in per_token.items()}
            for name, value in mine.items():
                if value is not None and len(value) != traj.num_tokens:
                    raise ArchiveError(f"{name}[{i}] has {len(value)} values for {traj.num_tokens} tokens "
                                       f"(trajectory {traj.trajectory_id})")
            bad = _bad_decision(mine["decisions"])
            if bad is not None:
                raise ArchiveError(f"decisions[{i}] {bad} (trajectory {traj.trajectory_id})")
            if mine["route_flips"] is not None and any(type(f) is not int or f < 0 for f in mine["route_flips"]):
                raise ArchiveError(f"route_flips[{i}] must hold ints >= 0 (layer bitmasks) "
                                   f"(trajectory {traj.trajectory_id})")
            rows.append(_row(traj, status, step, policy_version, mine, now))
        self._buffer += rows  # all or nothing: a bad entry buffers none of the call's rows
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> Path | None:
        """Write the buffered rows as one part (and its index); returns the part's path."""
        if not self._buffer:
            return None
        table = pa.Table.from_pylist(self._buffer, schema=_SCHEMA)
        index = [_index_row(r) for r in self._buffer]
        number = self._next_number()
        while True:
            part = self.dir / f"part-{number:06d}.parquet"
            tmp = self._tmp(".parquet")
            pq.write_table(table, tmp, compression="zstd")
            try:
                _publish(tmp, part)
                break
            except FileExistsError:  # another writer took this number
                number += 1
        tmp = self._tmp(".json")
        tmp.write_text(json.dumps({"format": FORMAT_VERSION, "part": part.name, "rows": index}))
        _publish(tmp, _index_path(part))
        self._buffer = []
        return part

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> "TrajectoryArchive":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- reading ------------------------------------------------------------------------------
    def parts(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("part-*.parquet") if _PART_RE.fullmatch(p.name))

    def index(self, **filters: Any) -> list[dict[str, Any]]:
        """Index rows (dicts with `INDEX_FIELDS` + `part`) of the written parts, optionally filtered
        (see `matches` for the filter names)."""
        rows: list[dict[str, Any]] = []
        for part in self.parts():
            if part.name in self.skipped:
                continue
            path = _index_path(part)
            try:
                index_rows = json.loads(path.read_text())["rows"]
                if not all(isinstance(r, dict) and set(INDEX_FIELDS) <= set(r) for r in index_rows):
                    raise ValueError("rows without the index fields")
            except FileNotFoundError:  # written after _repair by a concurrent writer's crash
                index_rows = self._read_index_rows(part)
            except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
                log.warning("%s: corrupt index (%s); rebuilding it from the part in memory", path, exc)
                index_rows = self._read_index_rows(part)
            if index_rows is not None:
                rows += [{**r, "part": part.name} for r in index_rows if matches(r, **filters)]
        return rows

    def _read_index_rows(self, part: Path) -> list[dict[str, Any]] | None:
        """The index rows of a part read from the part itself; None (and noted) if it is unreadable."""
        try:
            return [_index_row(r) for r in pq.read_table(part).to_pylist()]
        except (pa.ArrowException, OSError, ValueError, TypeError, KeyError) as exc:
            self._skip(part, exc)
            return None

    def _skip(self, part: Path, exc: Exception) -> None:
        if part.name not in self.skipped:
            self.skipped[part.name] = f"unreadable part ({type(exc).__name__}: {exc})"
            log.warning("skipping %s: %s", part, self.skipped[part.name])

    def records(self, ids: Iterable[str] | None = None, limit: int | None = None,
                errors: list[str] | None = None, **filters: Any) -> list[ArchivedTrajectory]:
        """Full rows (trajectory + archive fields) matching `ids` and `filters`, in archive order.
        A malformed row raises `ArchiveError`, unless `errors` is a list: then the row is left out
        and its error message appended there (one bad row does not hide the others)."""
        wanted = None if ids is None else set(ids)
        rows = [r for r in self.index(**filters) if wanted is None or r["trajectory_id"] in wanted]
        if limit is not None:
            rows = rows[:limit]
        by_part: dict[str, set[str]] = {}
        for r in rows:
            by_part.setdefault(r["part"], set()).add(r["trajectory_id"])
        found: dict[tuple[str, str], ArchivedTrajectory] = {}  # (part, id): a part that was skipped finds none
        for part, tids in by_part.items():
            try:
                table = pq.read_table(self.dir / part, filters=[("trajectory_id", "in", sorted(tids))])
            except (pa.ArrowException, OSError) as exc:
                self._skip(self.dir / part, exc)
                continue
            for row in table.to_pylist():
                try:
                    found[(part, row["trajectory_id"])] = _record(row, part)
                except ArchiveError as exc:
                    if errors is None:
                        raise
                    errors.append(str(exc))
        return [found[key] for r in rows if (key := (r["part"], r["trajectory_id"])) in found]

    def load(self, ids: Iterable[str] | None = None, limit: int | None = None, **filters: Any) -> list[Trajectory]:
        """Trajectories matching `ids` and `filters` (see `matches`)."""
        return [r.trajectory for r in self.records(ids, limit=limit, **filters)]

    def __len__(self) -> int:
        return len(self.index())

    # ---- internals ----------------------------------------------------------------------------
    def _next_number(self) -> int:
        parts = self.parts()
        return int(_PART_RE.fullmatch(parts[-1].name).group(1)) + 1 if parts else 0  # type: ignore[union-attr]

    def _tmp(self, suffix: str) -> Path:
        fd, name = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=suffix)
        os.close(fd)
        return Path(name)

    def _repair(self) -> None:
        """Drop temp files of crashed writers (older than a minute, so a live writer's survive)
        and rebuild any missing index."""
        cutoff = time.time() - 60
        for tmp in self.dir.glob(".tmp-*"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except FileNotFoundError:
                pass
        for part in self.parts():
            if not _index_path(part).exists():
                rows = self._read_index_rows(part)
                if rows is None:
                    continue
                tmp = self._tmp(".json")
                tmp.write_text(json.dumps({"format": FORMAT_VERSION, "part": part.name, "rows": rows}))
                try:
                    _publish(tmp, _index_path(part))
                except FileExistsError:
                    pass


def matches(row: dict[str, Any], *, env_id: str | None = None, status: str | Sequence[str] | None = None,
            episode_status: str | None = None, min_reward: float | None = None, max_reward: float | None = None,
            min_version: int | None = None, max_version: int | None = None, max_staleness: int | None = None,
            step: int | None = None, failed: bool | None = None, task_id: str | None = None) -> bool:
    """Whether an index row passes the filters. `failed=True`: archived as failed or the episode
    failed; versions compare against the row's [min_version, max_version] range."""
    if env_id is not None and row["env_id"] != env_id:
        return False
    if task_id is not None and row["task_id"] != task_id:
        return False
    if status is not None and row["status"] not in ((status,) if isinstance(status, str) else tuple(status)):
        return False
    if episode_status is not None and row["episode_status"] != episode_status:
        return False
    if min_reward is not None and row["reward"] < min_reward:
        return False
    if max_reward is not None and row["reward"] > max_reward:
        return False
    if min_version is not None and (row["max_version"] is None or row["max_version"] < min_version):
        return False
    if max_version is not None and (row["min_version"] is None or row["min_version"] > max_version):
        return False
    if max_staleness is not None and (row["staleness"] or 0) > max_staleness:
        return False
    if step is not None and row["step"] != step:
        return False
    if failed is not None and failed != (row["status"] == "failed" or row["episode_status"] == "failed"):
        return False
    return True


def _publish(tmp: Path, final: Path) -> None:
    # link() refuses to replace an existing file (rename would), so no part is ever overwritten
    try:
        os.link(tmp, final)
    finally:
        tmp.unlink()


def _index_path(part: Path) -> Path:
    return part.with_name(part.name.replace(".parquet", ".index.json"))


def _bad_decision(decisions: Sequence[Any] | None) -> str | None:
    """What is wrong with a per-token decision list (None if nothing)."""
    if decisions is None:
        return None
    wrong = [d for d in decisions if type(d) is not int or d not in DECISION_VALUES]
    if wrong:
        return f"holds {wrong[0]!r}, not a TokenDecision value ({DECISION_VALUES.start}..{DECISION_VALUES.stop - 1})"
    return None


def _pack_flips(flips: Sequence[int] | None) -> tuple[bytes | None, int | None]:
    if flips is None:
        return None, None
    width = max(1, (max(flips, default=0).bit_length() + 7) // 8)
    return b"".join(f.to_bytes(width, "little") for f in flips), width


def _unpack_flips(data: Any, width: Any, n: int) -> list[int] | None:
    """Packed bitmasks -> one int per token; raises ValueError naming what does not fit."""
    if data is None:
        return None
    if type(width) is not int or width < 1:
        raise ValueError(f"route_flip_bytes must be an int >= 1, got {width!r}")
    if len(data) != n * width:
        raise ValueError(f"route_flips has {len(data)} bytes; {n} tokens x {width} bytes need {n * width}")
    return [int.from_bytes(data[i : i + width], "little") for i in range(0, len(data), width)]


def _row(traj: Trajectory, status: str, step: int | None, policy_version: int | None,
         per_token: dict[str, Sequence | None], now: float) -> dict[str, Any]:
    lo, hi = traj.min_policy_version, traj.max_policy_version
    train_logprobs, decisions = per_token["train_logprobs"], per_token["decisions"]
    flips, flip_bytes = _pack_flips(per_token["route_flips"])
    return {
        "trajectory_id": traj.trajectory_id, "run_id": traj.run_id, "group_id": traj.group_id,
        "env_id": traj.env_id, "env_kwargs": json.dumps(traj.env_kwargs, default=str), "task_id": traj.task_id,
        "seed": traj.seed, "status": str(status), "step": step,
        "policy_version": policy_version, "min_version": lo, "max_version": hi,
        "staleness": None if policy_version is None or lo is None else max(0, policy_version - lo),
        "reward": float(traj.reward), "reward_detail": json.dumps(traj.reward_detail, default=str),
        "episode_status": str(traj.status), "error": traj.error, "messages": json.dumps(traj.messages),
        "token_ids": traj.token_ids, "logprobs": traj.logprobs, "loss_mask": traj.loss_mask,
        "train_logprobs": None if train_logprobs is None else [float(x) for x in train_logprobs],
        "decisions": None if decisions is None else list(decisions),
        "route_flips": flips, "route_flip_bytes": flip_bytes,
        "segments": [list(s) for s in traj.segments], "timings": json.dumps(traj.timings),
        "sandbox": None if traj.sandbox is None else traj.sandbox.model_dump_json(),
        "created_at": traj.created_at, "archived_at": now,
    }


def _index_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row[k] for k in INDEX_FIELDS if k in row}
    out["num_tokens"] = len(row["token_ids"] or [])
    out["num_turns"] = sum(1 for m in json.loads(row["messages"]) if m.get("role") == "assistant")
    return out


def _record(row: dict[str, Any], part: str) -> ArchivedTrajectory:
    try:
        traj = Trajectory(
            run_id=row["run_id"], trajectory_id=row["trajectory_id"], group_id=row["group_id"],
            env_id=row["env_id"], env_kwargs=json.loads(row.get("env_kwargs") or "{}"),
            task_id=row["task_id"], seed=row["seed"], messages=json.loads(row["messages"]), token_ids=row["token_ids"] or [],
            logprobs=row["logprobs"] or [], loss_mask=row["loss_mask"] or [],
            segments=[Segment(*s) for s in row["segments"] or []], reward=row["reward"],
            reward_detail=json.loads(row["reward_detail"]), status=row["episode_status"], error=row["error"],
            timings=json.loads(row["timings"]),
            sandbox=None if row["sandbox"] is None else json.loads(row["sandbox"]), created_at=row["created_at"],
        )
        n = traj.num_tokens
        # per-token fields: absent from older parts (None); present, they must cover every token
        train, decisions = row.get("train_logprobs"), row.get("decisions")
        for name, values in (("train_logprobs", train), ("decisions", decisions)):
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} values for {n} tokens")
        bad = _bad_decision(decisions)
        if bad is not None:
            raise ValueError(f"decisions {bad}")
        flips = _unpack_flips(row.get("route_flips"), row.get("route_flip_bytes"), n)
    except (ValueError, TypeError, KeyError) as exc:
        raise ArchiveError(f"{part}: trajectory {row.get('trajectory_id')!r} is invalid: {exc}") from None
    return ArchivedTrajectory(trajectory=traj, status=row["status"], step=row["step"],
                              policy_version=row["policy_version"], staleness=row["staleness"],
                              train_logprobs=train, part=part, decisions=decisions, route_flips=flips)
