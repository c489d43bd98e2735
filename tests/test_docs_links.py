"""Links between the README and the pages under docs/ point at files and headings that exist.

For README.md and every docs/*.md: each relative markdown link `[text](path)` or `[text](path#anchor)` (images
too) must name an existing file in the repository, and each `#anchor`, in the same file or another markdown file,
must match one of the target's headings under GitHub's slug rules. Web and mail links are not checked (no
network). Links inside fenced code blocks and inline code are not links. The README stays a short front door.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
# [text](target) or ![alt](target), with an optional "title"; the text may hold one level of brackets.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_MD_LINK_TEXT = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)")
_SKIP_SCHEMES = ("http://", "https://", "mailto:")


def _outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line that is not inside a fenced code block."""
    out, fence = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)[0] * len(m.group(1))
                continue
            out.append((n, line))
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
            fence = None
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text, before duplicates are numbered."""
    text = _MD_LINK_TEXT.sub(r"\1", heading)  # a link in a heading contributes its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # letters, digits, underscores, hyphens and spaces survive
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, duplicates numbered -1, -2, ... as GitHub does."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _outside_fences(path.read_text(encoding="utf-8")):
        m = _ATX_HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link outside code."""
    lines = _outside_fences(path.read_text(encoding="utf-8"))
    # Join the prose back together (fenced lines blanked) so that code spans broken over lines pair correctly.
    by_number = dict(lines)
    last = max(by_number, default=0)
    text = "\n".join(by_number.get(n, "") for n in range(1, last + 1))
    text = _INLINE_CODE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _LINK.finditer(text)]


def broken_links(path: Path, root: Path) -> list[str]:
    """One line per link of `path` that does not resolve: a missing file, or an anchor with no heading."""
    problems = []
    root = root.resolve()
    for line, target in links(path):
        if target.lower().startswith(_SKIP_SCHEMES):
            continue
        where = f"{path.relative_to(root)}:{line}: ({target})"
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part)
        if not file_part:
            dest = path
        elif file_part.startswith("/"):
            dest = (root / file_part.lstrip("/")).resolve()
        else:
            dest = (path.parent / file_part).resolve()
        if dest != root and root not in dest.parents:
            problems.append(f"{where} points outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{where} names a file that does not exist: {dest.relative_to(root)}")
            continue
        if anchor and dest.suffix.lower() == ".md":
            if dest.is_dir() or unquote(anchor) not in anchors(dest):
                problems.append(f"{where} has no heading #{anchor} in {dest.relative_to(root)}")
    return problems


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    problems = broken_links(path, ROOT)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_short() -> None:
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail into docs/ (limit {README_MAX_LINES})"


def test_readme_links_into_docs() -> None:
    targets = {t.partition("#")[0] for _, t in links(ROOT / "README.md")}
    assert {"docs/serving.md", "docs/benchmarks.md", "docs/exactness.md"} <= targets


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("Streaming protocol (`/v1/stream`)", "streaming-protocol-v1stream"),
        ("Prompts across restarts (`--prompt-dir DIR`)", "prompts-across-restarts---prompt-dir-dir"),
        ("Paper plan: 10,000 concurrent callers", "paper-plan-10000-concurrent-callers"),
        ("The web page (`GET /`)", "the-web-page-get-"),
        ("Batching many sessions (`token2wav.Batcher`)", "batching-many-sessions-token2wavbatcher"),
        ("Set-up (fresh machine, Python ≥ 3.10)", "set-up-fresh-machine-python--310"),
        ("snake_case and [a link](x.md)", "snake_case-and-a-link"),
    ],
)
def test_slug_follows_github(heading: str, expected: str) -> None:
    assert slug(heading) == expected


def test_checker_reports_broken_links(tmp_path: Path) -> None:
    """The checker can fail: every kind of broken link below is reported, and nothing else."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "sub" / "b.md").write_text("# B\n\n## Section two\n", encoding="utf-8")
    (tmp_path / "a.md").write_text(
        "# Hello, World!\n\n## Hello, World!\n\n"
        "[same](#hello-world) [duplicate](#hello-world-1) [bad anchor](#hello-world-2)\n"
        "[cross](sub/b.md#section-two) [bad cross](sub/b.md#section-three) [missing](nowhere.md)\n"
        "![image](img.png) ![missing image](gone.png) [web](https://example.com/x.md#y) [mail](mailto:a@b.c)\n"
        "[outside](../../etc/passwd) `[in code](nope.md)`\n\n"
        "```\n[in a fence](nope.md)\n```\n\n"
        "[broken over\nlines](also-missing.md) and `code that\n[spans](lines.md)` then [last](#b)\n",
        encoding="utf-8",
    )
    problems = broken_links(tmp_path / "a.md", tmp_path)
    reported = sorted(p.split(" (", 1)[1].split(")", 1)[0] for p in problems)
    assert reported == sorted(
        ["#hello-world-2", "sub/b.md#section-three", "nowhere.md", "gone.png", "../../etc/passwd",
         "also-missing.md", "#b"]
    ), problems
    assert any(p.startswith("a.md:5: (#hello-world-2)") for p in problems), problems
    assert any(p.startswith("a.md:14: (also-missing.md)") for p in problems), problems
