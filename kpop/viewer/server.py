"""`kpop view RUN`: a local web page over a run directory (and its sibling runs).

    server = make_server("runs/demo", port=0)       # 127.0.0.1 only; port 0 picks a free one
    server.serve_forever()

The page (static/index.html + app.js, no CDN, no network) talks to a small JSON API:

    GET /api/runs                                    runs in the parent directory, with counts
    GET /api/runs/<run>/trajectories?env_id=&min_reward=&max_reward=&min_version=&max_version=
                                       &max_staleness=&failed=&status=     index rows
    GET /api/runs/<run>/trajectories/<id>            messages, reward detail, per-token view
    GET /api/runs/<run>/plots                        inline SVG plots of metrics.jsonl

Tokens are decoded with the run's tokenizer: the final policy's (`policy/`, where a run saves
it), else the newest checkpoint that has one (`checkpoints/<step>/`); without one, they are
shown as ids. Each token carries both logprobs (rollout and learner), |delta logprob|, the
learner's decision (`kpop.algo.losses.TokenDecision`: kept, or masked and why) and the MoE layers
whose route flipped, as the learner archived them. An archive written before the learner recorded
decisions gets them recomputed from its `train_logprobs` with the correction of the run's
config.yaml. The run page plots the learner's mask rate, mismatch and route-flip rates per step.

JSON has no NaN or infinity (a browser's parser refuses the whole response), so non-finite
numbers travel as the strings "NaN", "Infinity" and "-Infinity" (JavaScript's `Number` reads them).

Only loopback is served, and only to requests whose Host header names loopback (localhost,
127.0.0.1 or [::1], with the server's port): a web page elsewhere that points its own domain at
127.0.0.1 (DNS rebinding) gets 403, not the run's data. Run names in URLs are single path
components (`kpop.config.check_run_name`), so `/api/runs/..` is never the runs' parent.
"""

from __future__ import annotations

import json
import logging
import math
import re
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from kpop.archive import ARCHIVE_DIR, ArchivedTrajectory, TrajectoryArchive
from kpop.config import AlgorithmConfig, check_run_name
from kpop.viewer.plots import series_plot

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
# The run page's panels: (panel id, title, ((metrics.jsonl key, series label), ...)), the keys as the
# learner and controller log them. The mismatch's mean and max get a panel each: the max is often
# 100x the mean, and on shared axes the mean would be a flat line at 0.
PLOTS: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("reward_mean", "reward", (("reward_mean", "reward"),)),
    ("staleness_mean", "staleness", (("staleness_mean", "staleness"),)),
    ("mask_rate", "mask rate (share of model tokens masked)", (("mask_rate", "mask rate"),)),
    ("dlogp_mean", "mean |Δ logprob| (train − rollout)", (("dlogp_mean", "mean"),)),
    ("dlogp_max", "max |Δ logprob| (train − rollout)", (("dlogp_max", "max"),)),
    ("route_flip_rate", "MoE route-flip rate", (("route_flip_rate", "all"), ("route_flip_rate_lightning", "Lightning"),
                                                ("route_flip_rate_mla", "MLA"))),
    ("eval_reward", "eval reward", (("eval_reward", "eval reward"),)),
)
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8"}
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_FLOAT_FILTERS = ("min_reward", "max_reward")
_INT_FILTERS = ("min_version", "max_version", "max_staleness", "step")
_STR_FILTERS = ("env_id", "status", "task_id", "episode_status")


class BadRequest(ValueError):
    pass


def is_run(path: Path) -> bool:
    return path.is_dir() and ((path / ARCHIVE_DIR).is_dir() or (path / "metrics.jsonl").is_file())


class RunsView:
    """The data behind the API, for the runs under `root` (the parent of the run being viewed)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def run_dir(self, name: str) -> Path:
        try:
            check_run_name(name)  # one path component: never '..', '.', or a path
        except ValueError:
            raise FileNotFoundError(f"no run named {name!r} under {self.root}") from None
        path = self.root / name
        if not is_run(path) or path.resolve().parent != self.root.resolve():
            raise FileNotFoundError(f"no run named {name!r} under {self.root}")
        return path

    def runs(self) -> list[dict[str, Any]]:
        out = []
        for path in sorted(p for p in self.root.iterdir() if is_run(p)):
            index = TrajectoryArchive(path).index() if (path / ARCHIVE_DIR).is_dir() else []
            rewards = [r["reward"] for r in index]
            out.append({"name": path.name, "trajectories": len(index),
                        "reward_mean": sum(rewards) / len(rewards) if rewards else None,
                        "failed": sum(r["status"] == "failed" or r["episode_status"] == "failed" for r in index),
                        "steps": len(_metrics(path, "rl"))})
        return out

    def trajectories(self, run: str, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        filters: dict[str, Any] = {}
        for key, values in query.items():
            value = values[-1]
            if value == "":
                continue
            try:
                if key in _FLOAT_FILTERS:
                    filters[key] = float(value)
                elif key in _INT_FILTERS:
                    filters[key] = int(value)
                elif key in _STR_FILTERS:
                    filters[key] = value
                elif key == "failed":
                    filters[key] = value.lower() in ("1", "true", "yes")
                else:
                    raise BadRequest(f"unknown filter {key!r}; known: "
                                     f"{sorted((*_FLOAT_FILTERS, *_INT_FILTERS, *_STR_FILTERS, 'failed'))}")
            except ValueError as exc:
                if isinstance(exc, BadRequest):
                    raise
                raise BadRequest(f"filter {key}={value!r} is not a number") from None
        return TrajectoryArchive(self.run_dir(run)).index(**filters)

    def trajectory(self, run: str, trajectory_id: str) -> dict[str, Any]:
        run_dir = self.run_dir(run)
        records = TrajectoryArchive(run_dir).records(ids=[trajectory_id])
        if not records:
            raise FileNotFoundError(f"run {run!r} has no trajectory {trajectory_id!r}")
        rec = records[0]
        t = rec.trajectory
        tokens, decided_by = self._tokens(run_dir, rec)
        return {"trajectory_id": t.trajectory_id, "run_id": t.run_id, "env_id": t.env_id, "task_id": t.task_id,
                "seed": t.seed, "group_id": t.group_id, "reward": t.reward, "reward_detail": t.reward_detail,
                "episode_status": t.status, "error": t.error, "status": rec.status, "step": rec.step,
                "policy_version": rec.policy_version, "staleness": rec.staleness, "timings": t.timings,
                "messages": t.messages, "segments": [list(s) for s in t.segments],
                "decisions": _decision_names(), "decided_by": decided_by, "tokens": tokens}

    def plots(self, run: str) -> list[dict[str, str]]:
        run_dir = self.run_dir(run)
        rows = _metrics(run_dir, None)
        out = []
        for panel, title, keys in PLOTS:
            series = {label: _points(rows, key) for key, label in keys}
            if any(series.values()):
                out.append({"metric": panel, "title": title, "svg": series_plot(series, title=title)})
        return out

    def _tokens(self, run_dir: Path, rec: ArchivedTrajectory) -> tuple[list[dict[str, Any]], str | None]:
        """Per token: text, ids, both logprobs, |delta logprob|, the learner's decision and the MoE
        layers whose route flipped; and where the decisions came from (None: nowhere)."""
        t = rec.trajectory
        n = t.num_tokens
        tok = _tokenizer(str(run_dir))
        texts = ([tok.decode([i], skip_special_tokens=False) for i in t.token_ids] if tok is not None
                 else [f"#{i} " for i in t.token_ids])
        version = [None] * n
        for s in t.segments:
            version[s.start:s.end] = [s.version] * (s.end - s.start)
        train, decisions, flips = rec.train_logprobs, rec.decisions, rec.route_flips
        decided_by = "the learner" if decisions is not None else None
        if decisions is None and train is not None:  # archived before the learner recorded its decisions
            algo = _algorithm(run_dir)
            decisions = _recompute_decisions(train, t.logprobs, t.loss_mask, algo)
            setting = {"kpop": f", kpop_phi {algo.kpop_phi}",
                       "icepop": f", window [{algo.icepop_alpha}, {algo.icepop_beta}]"}.get(algo.correction, "")
            source = "the run's config.yaml" if (run_dir / "config.yaml").is_file() else "the defaults: no config.yaml"
            decided_by = f"the viewer ({algo.correction}{setting}, from {source}): the archive has no learner decisions"
        out = []
        for i in range(n):
            lp, tr, m = t.logprobs[i], (train[i] if train is not None else None), t.loss_mask[i]
            # only a model token has a rollout logprob (the rollout writes 0.0 for the others)
            d = abs(tr - lp) if m and tr is not None else None
            out.append({"id": t.token_ids[i], "text": texts[i], "mask": m, "version": version[i],
                        "logprob": lp, "train_logprob": tr, "dlogp": d,
                        "decision": None if decisions is None else int(decisions[i]),
                        "route_flips": None if flips is None else _bits(flips[i])})
        return out, decided_by


def _bits(mask: int) -> list[int]:
    """The set bits of a route-flip bitmask: the MoE layers (0-based, main stack order) that flipped."""
    bits = bin(mask)[:1:-1]  # least significant first; str.find visits only the set bits
    out, layer = [], bits.find("1")
    while layer >= 0:
        out.append(layer)
        layer = bits.find("1", layer + 1)
    return out


def _decision_names() -> dict[int, dict[str, str]]:
    from kpop.algo.losses import TokenDecision  # imports torch: only a trajectory page needs it

    return {int(d): {"name": d.name, "reason": d.reason} for d in TokenDecision}


def _recompute_decisions(train: list[float], rollout: list[float], loss_mask: list[int],
                         algo: AlgorithmConfig) -> list[int]:
    import torch

    from kpop.algo.losses import LossSpec, token_decisions

    f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return token_decisions(f64(train), f64(rollout), torch.tensor(loss_mask, dtype=torch.bool),
                           LossSpec.from_config(algo)).tolist()


def _points(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) of the rows that logged `key` as a finite number (metrics.jsonl is run output:
    a row may lack the key, or hold a string, a bool or a NaN)."""
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    return [(r["step"], r[key]) for r in rows if num(r.get(key)) and num(r.get("step"))]


def _metrics(run_dir: Path, phase: str | None) -> list[dict[str, Any]]:
    from kpop.metrics import read_metrics

    try:
        return read_metrics(run_dir, phase)
    except json.JSONDecodeError:  # a live run may be mid-line: read what is complete
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return [r for r in rows if phase is None or r.get("phase") == phase]


def _algorithm(run_dir: Path) -> AlgorithmConfig:
    """The run's `algorithm` section (config.yaml), or the defaults where it cannot be read. Keys
    this version does not know are left out: a run of another version still shows its own phi."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return AlgorithmConfig()
    import yaml

    try:
        algo = (yaml.safe_load(path.read_text()) or {}).get("algorithm") or {}
        return AlgorithmConfig.model_validate({k: v for k, v in algo.items() if k in AlgorithmConfig.model_fields})
    except (yaml.YAMLError, AttributeError, TypeError, ValueError) as exc:  # pydantic's errors are ValueErrors
        log.warning("%s: cannot read the algorithm section (%s); using the defaults", path, exc)
        return AlgorithmConfig()


def _finite(data: Any) -> Any:
    """`data` with its non-finite floats as strings (a NaN logprob must not blank the page)."""
    if isinstance(data, float) and not math.isfinite(data):
        return "NaN" if math.isnan(data) else ("Infinity" if data > 0 else "-Infinity")
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def _step_key(d: Path) -> tuple[int, str]:
    digits = d.name.lstrip("v")  # learner checkpoints are v<version>
    return (int(digits) if digits.isdigit() else -1, d.name)


@lru_cache(maxsize=8)
def _tokenizer(run_dir: str) -> Any:
    run = Path(run_dir)
    candidates = [run / "policy"] + sorted(run.glob("checkpoints/*"), key=_step_key, reverse=True)
    found = next((d for d in candidates if (d / "tokenizer.json").is_file()), None)
    if found is None:
        return None
    from kpop.policy.tokenizer import load_tokenizer

    return load_tokenizer(found)


class _Handler(BaseHTTPRequestHandler):
    view: RunsView
    default_run: str

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("viewer: " + fmt, *args)

    def _host_ok(self) -> bool:
        port = self.server.server_address[1]
        host = self.headers.get("Host", "")
        return host in {f"{h}:{port}" for h in _LOOPBACK_HOSTS} | (set(_LOOPBACK_HOSTS) if port == 80 else set())

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if not self._host_ok():
            # DNS rebinding: a page of another site that resolves its name to 127.0.0.1
            return self._json({"error": f"Host {self.headers.get('Host')!r} is not this loopback server"},
                              HTTPStatus.FORBIDDEN)
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        try:
            if not parts or parts == ["index.html"]:
                return self._file(STATIC / "index.html")
            if parts[0] == "static" and len(parts) == 2 and _NAME.fullmatch(parts[1]):
                return self._file(STATIC / parts[1])
            if parts[0] == "api":
                return self._json(self._api(parts[1:], parse_qs(url.query)))
            raise FileNotFoundError(url.path)
        except FileNotFoundError as exc:
            self._json({"error": str(exc)}, HTTPStatus.NOT_FOUND)
        except BadRequest as exc:
            self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
        except Exception as exc:  # keep serving; show the cause on the page
            log.exception("viewer request %s failed", self.path)
            self._json({"error": f"{type(exc).__name__}: {exc}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def _api(self, parts: list[str], query: dict[str, list[str]]) -> Any:
        if parts == ["runs"]:
            return {"default": self.default_run, "runs": self.view.runs()}
        if len(parts) >= 3 and parts[0] == "runs":
            run = parts[1]
            if parts[2:] == ["trajectories"]:
                return self.view.trajectories(run, query)
            if len(parts) == 4 and parts[2] == "trajectories":
                return self.view.trajectory(run, parts[3])
            if parts[2:] == ["plots"]:
                return self.view.plots(run)
        raise FileNotFoundError("/api/" + "/".join(parts))

    def _file(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(path.name)
        self._send(path.read_bytes(), _CONTENT_TYPES.get(path.suffix, "application/octet-stream"))

    def _json(self, data: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(json.dumps(_finite(data), default=str, allow_nan=False).encode(), "application/json", status)

    def _send(self, body: bytes, ctype: str, status: HTTPStatus = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # a live run keeps changing
        self.end_headers()
        self.wfile.write(body)


def make_server(run_dir: str | Path, port: int = 8765, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """An HTTP server for `run_dir` and its sibling runs; call `serve_forever()` on it."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the viewer serves loopback only; host {host!r} is not a loopback address")
    run_dir = Path(run_dir).resolve()
    if not is_run(run_dir):
        raise FileNotFoundError(f"{run_dir}: not a run directory (no {ARCHIVE_DIR}/ and no metrics.jsonl)")
    handler = type("Handler", (_Handler,), {"view": RunsView(run_dir.parent), "default_run": run_dir.name})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
