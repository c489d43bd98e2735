"""Build the demo voice's text corpus from text that ships with Python and Debian.

Sources: ``pydoc_data.topics`` (Python's reference prose) and the Debian ``fortunes`` / ``fortunes-min``
packages (``/usr/share/games/fortunes``). Sentences are cleaned to plain English words so that flite reads
them literally and pocketsphinx transcripts can be compared word by word (no digits, no code, no URLs).

Output: ``<out>/sentences.tsv`` with ``id<TAB>split<TAB>text``; split is ``train`` or ``heldout``.
The split is a seeded shuffle, so the same packages give the same corpus.

    python recipes/demo/corpus.py --out work_data/demo --heldout 60 --seed 1234
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
# Collections that are mostly prose; ascii-art and similar would only add noise.
FORTUNE_FILES = [
    "fortunes",
    "computers",
    "cookie",
    "definitions",
    "education",
    "food",
    "humorists",
    "kids",
    "law",
    "literature",
    "love",
    "magic",
    "medicine",
    "men-women",
    "miscellaneous",
    "news",
    "people",
    "pets",
    "platitudes",
    "politics",
    "science",
    "sports",
    "wisdom",
    "work",
    "linux",
    "paradoxum",
    "riddles",
    "goedel",
    "drugs",
    "pratchett",
    "startrek",
    "tao",
    "zippy",
    "songs-poems",
]

_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")
_ALLOWED = re.compile(r"^[A-Za-z ,.;:!?'\-]+$")


def _clean(sentence: str) -> str | None:
    s = sentence.replace("--", ", ").replace('"', "").replace("`", "'")
    s = " ".join(s.split()).replace(" ,", ",").strip(" -'")
    if not s or not _ALLOWED.match(s):
        return None
    words = [w for w in re.split(r"[\s,.;:!?\-]+", s) if w]
    if not 4 <= len(words) <= 24:
        return None
    if sum(w.isupper() and len(w) > 1 for w in words) > 1:  # acronyms and shouting read badly
        return None
    if s[0].islower():
        return None
    if s[-1] not in ".!?":
        s = s + "."
    return s


def _fortune_entries(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    entries = []
    for entry in text.split("\n%\n"):
        # Attribution lines ("-- Someone") are not part of the quote.
        lines = [ln for ln in entry.splitlines() if not ln.strip().startswith("--")]
        entries.append(" ".join(ln.strip() for ln in lines))
    return entries


def _pydoc_paragraphs() -> list[str]:
    import pydoc_data.topics as topics

    paras = []
    for body in topics.topics.values():
        for para in body.split("\n\n"):
            # Indented paragraphs are code or grammar productions.
            if para.startswith(" ") or "::" in para or "=" in para:
                continue
            paras.append(" ".join(para.split()))
    return paras


def collect() -> list[str]:
    """All distinct clean sentences, in a deterministic order."""
    chunks: list[str] = _pydoc_paragraphs()
    for name in FORTUNE_FILES:
        p = FORTUNE_DIR / name
        if p.exists():
            chunks.extend(_fortune_entries(p))
    seen: set[str] = set()
    out: list[str] = []
    for chunk in chunks:
        for raw in _SENT_SPLIT.split(chunk):
            s = _clean(raw)
            if s is None:
                continue
            key = s.lower()
            if key not in seen:
                seen.add(key)
                out.append(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("work_data/demo"))
    ap.add_argument("--heldout", type=int, default=60, help="sentences kept out of training (per corpus)")
    ap.add_argument("--max-sentences", type=int, default=0, help="cap on training sentences (0 = all)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    sentences = collect()
    rng = random.Random(args.seed)
    rng.shuffle(sentences)
    held, train = sentences[: args.heldout], sentences[args.heldout :]
    if args.max_sentences:
        train = train[: args.max_sentences]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "sentences.tsv", "w", encoding="utf-8") as f:
        for i, s in enumerate(held):
            f.write(f"h{i:05d}\theldout\t{s}\n")
        for i, s in enumerate(train):
            f.write(f"t{i:05d}\ttrain\t{s}\n")
    words = sum(len(s.split()) for s in train)
    print(f"{len(sentences)} distinct sentences: {len(train)} train ({words} words), {len(held)} held out")


if __name__ == "__main__":
    main()
