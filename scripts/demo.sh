#!/usr/bin/env bash
# ReDi and T-Stitch demo on the embedded crops models (no downloads beyond the package registries).
# Usage: bash scripts/demo.sh [--fresh] [--captions N --seeds S --queries Q] [--output DIR] ...
#        bash scripts/demo.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$REDI_PYTHON" -m embedded.demo "$@"
