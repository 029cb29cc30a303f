#!/usr/bin/env bash
# Install everything and run the main job: `cosine demo`. Extra arguments go to `cosine demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/cosine demo "$@"
