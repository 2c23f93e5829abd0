#!/usr/bin/env bash
# Installs Debian's Chromium and its WebDriver (chromium, chromium-driver) for the browser test
# (tests/test_frontend_browser.py) when they are missing. Needs root for apt-get; as another
# user it says what to run and exits 1. No browser is downloaded from anywhere else.
#   bash scripts/install_browser.sh
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "[redi browser] Chromium or chromedriver is missing; install them with: sudo apt-get install -y chromium chromium-driver" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[redi browser] no apt-get here: install Chromium and the chromedriver of the same version, then set REDI_CHROMIUM and REDI_CHROMEDRIVER to their paths" >&2
  exit 1
fi
echo "[redi browser] installing chromium and chromium-driver with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q chromium chromium-driver >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
command -v chromium >/dev/null && command -v chromedriver >/dev/null
