"""Word error rate with the normalization the eval references need (mixed case, punctuation, numbers).

Shared by the test suite and the benchmarks so that both score transcripts the same way.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

_SMALL = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split()
)
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_SPELLING = {
    "colour": "color",
    "honour": "honor",
    "favour": "favor",
    "labour": "labor",
    "neighbour": "neighbor",
    "dishonoured": "dishonored",
    "honoured": "honored",
    "mr": "mister",
    "mrs": "missus",
    "dr": "doctor",
    "okay": "ok",
    "grey": "gray",
    "centre": "center",
    "theatre": "theater",
}


def _number_words(n: int) -> str:
    if n < 20:
        return _SMALL[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        return _TENS[tens - 2] + ("" if unit == 0 else " " + _SMALL[unit])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _SMALL[hundreds] + " hundred" + ("" if rest == 0 else " " + _number_words(rest))
    if n < 10000 and n % 100 and 1100 <= n < 2000:  # years like 1850 read as "eighteen fifty"
        return _number_words(n // 100) + " " + _number_words(n % 100)
    if n < 1_000_000:
        thousands, rest = divmod(n, 1000)
        return _number_words(thousands) + " thousand" + ("" if rest == 0 else " " + _number_words(rest))
    return str(n)


def normalize(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[-–—/]", " ", text)
    text = re.sub(r"(\d),(\d)", r"\1\2", text)
    text = re.sub(r"\d+", lambda m: " " + _number_words(int(m.group())) + " ", text)
    text = re.sub(r"[^\w\s']", " ", text)
    words = []
    for w in text.split():
        w = w.strip("'")
        if w:
            words.append(_SPELLING.get(w, w))
    return words


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def wer(reference: str, hypothesis: str) -> float:
    ref = normalize(reference)
    return edit_distance(ref, normalize(hypothesis)) / max(1, len(ref))


def corpus_wer(pairs: list[tuple[str, str]]) -> float:
    """Errors over reference words across all pairs (not the mean of per-clip rates)."""
    errors = words = 0
    for ref, hyp in pairs:
        r = normalize(ref)
        errors += edit_distance(r, normalize(hyp))
        words += len(r)
    return errors / max(1, words)


@dataclass(frozen=True)
class Clip:
    id: str
    path: Path
    text: str
    duration: float
    language: str
    subset: str
    speaker: str


def load_manifest(eval_dir: Path) -> list[Clip]:
    clips = []
    for line in (eval_dir / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        clips.append(
            Clip(
                row["id"],
                eval_dir / row["audio"],
                row["text"],
                row["duration_s"],
                row["language"],
                row["subset"],
                row["speaker"],
            )
        )
    return clips
