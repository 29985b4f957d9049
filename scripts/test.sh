#!/usr/bin/env bash
# Install recursify with its test dependencies and run the whole suite (the README's second command).
#   bash scripts/test.sh [pytest args]            pinned versions (constraints.txt), as CI runs it
#   bash scripts/test.sh --latest [pytest args]   the newest versions pyproject.toml allows: finds
#                                                 the next upstream break before users do
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--latest" ]]; then
    export RECURSIFY_LATEST=1
    shift
fi
source scripts/_install.sh
install_recursify "[test]"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q "$@"
