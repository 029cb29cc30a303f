#!/usr/bin/env bash
# Install everything CoSine needs into ./.venv (idempotent).
#   scripts/setup.sh          runtime dependencies
#   scripts/setup.sh --test   runtime + test dependencies
# PyTorch: if the venv has no torch yet, the CPU build pinned in constraints/cpu.txt is installed first.
# GPU users: install your CUDA build of torch into .venv before running this; it is kept.
# Elsewhere than our CI machines, PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu gives the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

# Debian packages: redis-server always; for the tests also chromium (the dashboard's browser test drives it
# through Playwright; no browser is ever downloaded).
apt_packages=""  # each with a leading space
command -v redis-server >/dev/null 2>&1 || apt_packages=" redis-server"
[ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1 && apt_packages="$apt_packages chromium"
if [ -n "$apt_packages" ]; then
  echo "installing${apt_packages} (Debian packages)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  # shellcheck disable=SC2086
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $apt_packages >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "installing PyTorch (CPU build, constraints/cpu.txt)"
  "$VPY" -m pip install -q -r constraints/cpu.txt
fi
echo "installing cosine${extras}"
"$VPY" -m pip install -q -e ".${extras}"
