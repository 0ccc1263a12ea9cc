"""Search: answer questions about the Python documentation with `search` and `read` tools.

Questions are generated from the corpus with a seed, in two kinds:
  cloze: a sentence from a passage with one word blanked; the answer is the word;
  title: a sentence from a passage; the answer is the title of its documentation section.
Search returns titles and short snippets, so the agent usually has to `read` a passage too
(search -> read -> answer). A question is kept only if BM25 finds its passage in the top 3
for the question's sentence, so the oracle's path always exists.
Reward: token F1 between the final answer and the gold answer after SQuAD normalisation
(exact match is reported too; it implies F1 = 1).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from environments.core import ChatEnv, Message, Resources, Task, assistant, count_assistant_turns
from environments.grading import exact_match, f1_score
from environments.search.corpus import Corpus
from environments.tools import Tool, Toolbox, ToolError, make_tool

SYSTEM = ("Answer the question about the Python documentation. Use search to find passages and read to "
          "see a passage in full. Reply with only the answer.")
SNIPPET_CHARS = 120
_COMMON = set("""about above after again against because before being below between could doesn during
further having itself myself other ourselves should their theirs themselves there these those through under
until where which while would without within always another either neither whether rather""".split())


@lru_cache(maxsize=4)
def _corpus(cache_dir: str | None) -> Corpus:
    # One index per process: it is read-only, and building/loading it is the slow part of reset.
    return Corpus(cache_dir)


def _sentences(text: str) -> list[str]:
    flat = " ".join(text.split())
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat)
            if 8 <= len(s.split()) <= 35 and "::=" not in s and s.count('"') <= 4 and s[0].isupper()]


def make_question(corpus: Corpus, n: int) -> dict[str, Any]:
    r = random.Random(n)
    for _ in range(200):
        p = r.choice(corpus.passages)
        sents = _sentences(p.text)
        if not sents:
            continue
        sent = r.choice(sents)
        if r.random() < 0.7:
            words = re.findall(r"\b[a-z]{6,}\b", sent)
            words = [w for w in words if sent.count(w) == 1 and w not in _COMMON]
            if not words:
                continue
            answer = r.choice(words)
            query = re.sub(rf"\b{answer}\b", "____", sent, count=1)
            question = f'Fill in the blank from the Python docs: "{query}"'
            kind = "cloze"
        else:
            query, answer, kind = sent, p.title, "title"
            question = f'Which section of the Python docs says: "{sent}"? Answer with the section title.'
        if p.id in [hit.id for hit in corpus.search(query, 3)]:
            return {"question": question, "answer": answer, "passage": p.id, "query": query, "kind": kind}
    raise RuntimeError(f"no answerable question found for seed {n}")  # never seen; guards an endless loop


class _Tools:
    def __init__(self, corpus: Corpus):
        self.corpus = corpus

    def search(self, query: str, k: int = 3) -> list[dict[str, str]]:
        """Search the Python documentation (BM25).

        Args:
            query: keywords or a sentence.
            k: how many results, 1 to 10.
        """
        if not 1 <= k <= 10:
            raise ToolError(f"k must be between 1 and 10, got {k}")
        return [{"id": p.id, "title": p.title, "snippet": " ".join(p.text.split())[:SNIPPET_CHARS]}
                for p in self.corpus.search(query, k)]

    def read(self, doc_id: str) -> str:
        """Read one passage in full.

        Args:
            doc_id: an id from search results, e.g. "assert#0".
        """
        p = self.corpus.by_id.get(doc_id)
        if p is None:
            raise ToolError(f"no passage with id {doc_id!r}")
        return f"{p.title}\n\n{p.text}"


class SearchEnv(ChatEnv):
    def __init__(self, cache_dir: str | None = None, max_turns: int | None = None, render_mode: str | None = None):
        super().__init__(max_turns=max_turns, render_mode=render_mode)
        self.corpus = _corpus(str(Path(cache_dir)) if cache_dir else None)
        impl = _Tools(self.corpus)
        self._toolset: list[Tool] = [make_tool(impl.search), make_tool(impl.read)]

    def _new_task(self, rng: np.random.Generator, options: dict[str, Any]) -> Task:
        if "task_id" in options:
            m = re.fullmatch(r"search/(\d+)", str(options["task_id"]))
            if not m:
                raise ValueError(f"bad search task_id {options['task_id']!r}; expected 'search/<n>'")
            n = int(m.group(1))
        else:
            n = int(rng.integers(1 << 31))
        q = make_question(self.corpus, n)
        return Task(task_id=f"search/{n}", prompt=q["question"], system=SYSTEM, data=q,
                    resources=Resources(step_timeout_s=10.0, max_turns=8))

    def _toolbox(self, task: Task) -> Toolbox:
        return Toolbox(self._toolset)

    def _verify(self, final: Message | None) -> tuple[float, dict[str, Any]]:
        assert self.task is not None
        gold = self.task.data["answer"]
        pred = (final or {}).get("content") or ""
        f1 = f1_score(pred, gold)
        return f1, {"f1": f1, "em": exact_match(pred, gold), "gold": gold, "kind": self.task.data["kind"]}

    def oracle_action(self, messages: Sequence[Message]) -> Message:
        assert self.task is not None
        plan = [("search", {"query": self.task.data["query"], "k": 3}), ("read", {"doc_id": self.task.data["passage"]})]
        step = count_assistant_turns(messages)
        if step < len(plan):
            return assistant(None, plan[step])
        return assistant(self.task.data["answer"])
