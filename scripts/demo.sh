#!/usr/bin/env bash
# Set up the package and run the main job: `rapa demo` on the default data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
rapa demo "$@"
