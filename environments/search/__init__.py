"""Search family: multi-step QA over CPython's documentation topics with a BM25 `search` tool."""

from environments.search.corpus import Corpus, Passage, load_passages
from environments.search.env import SearchEnv, make_question

__all__ = ["Corpus", "Passage", "SearchEnv", "load_passages", "make_question"]
