#!/usr/bin/env bash
# Creates Flower's own venv for bench/bench_vs_flower.py (make flower-env): the same Python, the
# same data loader (seglearn's smartwatch set; seglearn imports pandas without declaring it) and
# the same numpy as fedge's .venv, Flower pinned, and no model library: the bench's ClientApp is a
# numpy MLP with hand-written SGD, so the comparison is about the framework, not Keras or torch.
# Usage: bash scripts/flower-venv.sh [VENV_DIR]   (default .venv-flower; idempotent)
set -euo pipefail

VENV="${1:-.venv-flower}"
PYTHON="${PYTHON:-python3}"
FLWR_VERSION="1.42.0"
PINS=(
    "flwr==${FLWR_VERSION}"
    "numpy==2.4.6"
    "seglearn==1.2.5"
    "pandas==3.1.1"
    "scikit-learn==1.9.1"
)
STAMP="$VENV/.flower-installed"
WANT="${PINS[*]}"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
for tool in flower-superlink flower-supernode flwr flwr-clientapp; do
    [ -x "$VENV/bin/$tool" ] || { echo "flower-venv: $VENV/bin/$tool is missing" >&2; exit 1; }
done
echo "$WANT" >"$STAMP"
echo "flower-venv: $("$VENV/bin/flwr" --version 2>/dev/null | head -1) in $VENV"
