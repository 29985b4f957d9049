"""README.md and docs/ stay consistent with the repository: every relative link points at a file
that exists (and, into a markdown page, at a heading it has), every benchmarks/results/*.json the
text names exists, and the README stays a short user page. Pure file reading: milliseconds."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250

# Result files a page names before their run has produced them. An entry here is allowed to be
# missing; remove it once the file is committed.
PENDING_RESULTS: set[str] = set()

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^()\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
RESULT_JSON = re.compile(r"benchmarks/results/([\w.+-]+?\.json)\b")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def pages() -> list[Path]:
    return [README] + sorted((ROOT / "docs").rglob("*.md"))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def prose(text: str) -> str:
    """The text with fenced code blocks removed and code spans blanked (links live in prose)."""
    return CODE_SPAN.sub("``", FENCE.sub("", text))


def links(text: str) -> list[str]:
    return LINK.findall(prose(text))


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I))  # http:, https:, mailto:, ...


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_readme_is_at_most_250_lines():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail into docs/ (at most {MAX_README_LINES})"


def test_every_relative_link_target_exists():
    broken = []
    for page in pages():
        for target in links(page.read_text()):
            if is_external(target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{rel(page)}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_every_link_into_a_markdown_page_names_a_heading_it_has():
    broken = []
    for page in pages():
        for target in links(page.read_text()):
            if is_external(target) or "#" not in target:
                continue
            path, fragment = target.split("#", 1)
            dest = (page.parent / path) if path else page
            if dest.suffix == ".md" and dest.is_file() and fragment not in anchors(dest):
                broken.append(f"{rel(page)}: {target}")
    assert not broken, "links to headings that do not exist:\n" + "\n".join(broken)


def test_every_named_result_file_exists():
    missing = []
    for page in pages():
        for name in sorted(set(RESULT_JSON.findall(page.read_text()))):
            if name not in PENDING_RESULTS and not (ROOT / "benchmarks" / "results" / name).is_file():
                missing.append(f"{rel(page)}: benchmarks/results/{name}")
    assert not missing, "pages name result files that do not exist:\n" + "\n".join(missing)


def test_the_checks_see_links_and_result_names():
    """The patterns above find what they are meant to (a regex that matches nothing passes everything)."""
    text = ("See [a](docs/a.md#x), ![b](img.png \"t\"), [c](https://x.org), [d](#top), "
            "`[e](not-a-link.md)`, and `benchmarks/results/demo_10m.json`.\n```\n[f](in-code.md)\n```\n")
    assert links(text) == ["docs/a.md#x", "img.png", "https://x.org", "#top"]
    assert RESULT_JSON.findall(text) == ["demo_10m.json"]
    assert slug("Shared weights from calibration (`--init calibrated`)") == \
        "shared-weights-from-calibration---init-calibrated"
    assert slug("SmolLM2-135M at 75 %, 60 minutes") == "smollm2-135m-at-75--60-minutes"
