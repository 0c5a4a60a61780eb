#!/usr/bin/env bash
# Sets up mgd3 in ./.venv (idempotent; a second run with nothing changed takes a second).
#
# - torch/torchvision: pinned to the pair that installs from local disk on the project's
#   CPU machines (torch 2.14.1 + torchvision 0.29.1; PyPI's torchvision does not import
#   beside the 2.13.0 CPU wheel). Override with MGD3_TORCH_SPEC="torch==X torchvision==Y".
# - mgd3 itself, editable, with the test extras.
# - Fashion-MNIST from Debian's dataset-fashion-mnist package when apt-get is usable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${MGD3_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
stamp=.venv/.mgd3-setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing $TORCH_SPEC (a large wheel, about a minute from local disk)"
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q --disable-pip-version-check $TORCH_SPEC 2>&1 | { grep -v "^WARNING: Location" || true; }
  echo "setup: installing mgd3 (editable) with test extras"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
  echo "$want" > "$stamp"
fi

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian package dataset-fashion-mnist"
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
      || echo "setup: warning: could not install dataset-fashion-mnist; Fashion-MNIST commands will say how to get it"
  else
    echo "setup: note: Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist)"
  fi
fi
echo "setup: ready (.venv/bin/mgd3)"
