#!/usr/bin/env bash
# Set up everything the tests need (torch CPU, aihwkit, ray) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test --analog --ray
. .venv/bin/activate
python -m pytest -q "$@"
