#!/usr/bin/env bash
# jlora's test suite from a fresh clone: set up a virtual environment, install jlora with
# its test extra (PEFT + torch CPU for reference tests, transformers <5 for Flax models),
# then run pytest (pytest-xdist, JLORA_TEST_WORKERS workers, default one per core). Extra
# arguments go to pytest (e.g. -k transform). The suite also makes
# (or reuses) a second venv, .venv-tf5/ with transformers 5 and no torch, through
# scripts/venv-tf5.sh, and runs both notebooks in it (JLORA_SKIP_TF5=1 skips that).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# tunix's Qwen3 model code for tests/io/test_qwix.py, without tunix's training stack (datasets,
# grain, tensorflow-datasets, ...): its model module needs only what [test] installs
.venv/bin/python -m pip install -q --no-deps google-tunix==0.1.7
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two workers (one per core here, more where there are more cores); each test file runs
# whole in one worker, so the models a file compiles once are shared by its tests.
exec .venv/bin/python -m pytest -q -n "${JLORA_TEST_WORKERS:-auto}" --dist loadfile "$@"
