#!/usr/bin/env bash
# Install recursify (pinned versions) and run the main job on the bundled SmolLM2-135M (the
# README's first command): fetch real text, then calibrate, choose the loops and LoRA rank for 75%
# of the parameters, convert, distil and evaluate within a short time budget. Prints the summary.
#   bash scripts/demo.sh [BUDGET]      e.g. 10m (default), 60m for a better model
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
install_recursify ""
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bash scripts/fetch_corpora.sh corpus
recursify compress smollm2-135m --data corpus/python-docs/train --target-params 0.75 \
    --time-budget "${1:-10m}" --out runs/demo --overwrite
