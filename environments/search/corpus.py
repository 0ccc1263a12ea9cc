"""The search corpus: CPython's own documentation topics (`pydoc_data.topics`), BM25-indexed.

The corpus ships with every CPython, so nothing is downloaded. Topics are split into passages
of about `PASSAGE_CHARS` characters on paragraph boundaries; the BM25 index (bm25s) is built
once and cached under `cache_dir`, keyed by a hash of the passages and the bm25s version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import bm25s

log = logging.getLogger(__name__)
PASSAGE_CHARS = 700


def default_cache_dir() -> Path:
    return Path(os.environ.get("KPOP_CACHE", Path.home() / ".cache" / "kpop")) / "search"


@dataclass(frozen=True)
class Passage:
    id: str  # "<topic>#<n>"
    title: str  # the topic's heading, e.g. 'The "assert" statement'
    text: str


def load_passages() -> list[Passage]:
    from pydoc_data.topics import topics

    passages: list[Passage] = []
    for topic in sorted(topics):
        body = topics[topic].strip()
        lines = body.splitlines()
        title = lines[0].strip() if lines else topic
        if len(lines) > 1 and set(lines[1].strip()) <= set("*=-"):
            body = "\n".join(lines[2:]).strip()
        chunk: list[str] = []
        for para in re.split(r"\n\s*\n", body):
            para = para.strip("\n")
            if not para.strip():
                continue
            if chunk and sum(len(p) for p in chunk) + len(para) > PASSAGE_CHARS:
                passages.append(Passage(f"{topic}#{len(passages)}", title, "\n\n".join(chunk)))
                chunk = []
            chunk.append(para)
        if chunk:
            passages.append(Passage(f"{topic}#{len(passages)}", title, "\n\n".join(chunk)))
    return passages


def _tokenize(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class Corpus:
    """Passages plus a BM25 retriever over `title + text`."""

    def __init__(self, cache_dir: str | Path | None = None):
        self.passages = load_passages()
        self.by_id = {p.id: p for p in self.passages}
        texts = [f"{p.title}\n{p.text}" for p in self.passages]
        digest = hashlib.sha256(json.dumps([bm25s.__version__, PASSAGE_CHARS, texts]).encode()).hexdigest()[:16]
        path = Path(cache_dir or default_cache_dir()) / f"bm25-{digest}"
        if (path / "params.index.json").exists():
            self.retriever = bm25s.BM25.load(str(path))
        else:
            self.retriever = bm25s.BM25()
            self.retriever.index(_tokenize(texts), show_progress=False)
            self._save(path)

    def _save(self, path: Path) -> None:
        # Write to a temp dir and rename, so concurrent workers never read a half-written index.
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
            self.retriever.save(str(tmp), show_progress=False)
            try:
                tmp.rename(path)
            except OSError:  # another process won the race; its index is the same
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            log.warning("search index not cached at %s: %s", path, exc)

    def search(self, query: str, k: int = 3) -> list[Passage]:
        tokens = _tokenize([query])
        if not tokens[0]:
            return []
        k = max(1, min(k, len(self.passages)))
        ids, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [self.passages[int(i)] for i, s in zip(ids[0], scores[0], strict=True) if s > 0]
