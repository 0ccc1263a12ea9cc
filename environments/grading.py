"""Answer grading shared by the families: SQuAD-style normalised exact match / F1 and numbers."""

from __future__ import annotations

import math
import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?")


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation (but keep `_` so identifiers survive), articles and extra spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation) - {"_"})
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def numbers_in(text: str) -> list[float]:
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text)]


def last_number(text: str) -> float | None:
    nums = numbers_in(text)
    return nums[-1] if nums else None


def same_number(a: float | None, b: float, rel_tol: float = 1e-4) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-6)


def format_number(x: float) -> str:
    """17.0 -> '17', 2.54 -> '2.54', 1/3 -> '0.3333' (4 decimals: short, and enough for grading)."""
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.4f}".rstrip("0").rstrip(".")
