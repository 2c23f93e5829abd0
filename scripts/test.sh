#!/usr/bin/env bash
# Runs the whole test suite in the pack's isolated environment (set up on first use).
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$REDI_PYTHON" -m pytest "$@"
