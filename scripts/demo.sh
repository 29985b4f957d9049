#!/usr/bin/env bash
# Install recursify (pinned versions) and run the main job on the bundled SmolLM2-135M (the
# README's first command): fetch real text, then calibrate on 16,384 tokens, convert to 10 loops
# with per-linear LoRA ranks for 75% of the parameters, distil on 45,056 tokens and evaluate.
# The work is fixed, so every machine makes the same model; a slower one takes longer (23.6
# minutes on a slow day of the 2-core machine in docs/results/demo.md). The 30-minute budget is
# only a cap; gradient checkpointing keeps distillation's memory small for one more forward a step.
#   bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
install_recursify ""
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
bash scripts/fetch_corpora.sh corpus
recursify compress smollm2-135m --data corpus/python-docs/train --loops 10 --lora-rank auto --target-params 0.75 \
    --calib-tokens 16384 --max-tokens 45056 --gradient-checkpointing on --time-budget 30m --out runs/demo --overwrite
