#!/usr/bin/env bash
# CI step for the Python package: builds libkvmesh.so, makes a virtual
# environment, and runs bindings/python/tests against the real library.
#
#   bindings/python/ci.sh                    # ctypes bindings, store, TensorRT-LLM driver
#   KVMESH_CI_VLLM=1 bindings/python/ci.sh   # also installs vLLM 0.32.0 (CPU is enough;
#                                            # about 4.7 GB download) and runs the
#                                            # connector tests against vLLM's own classes
#
# Needs python3 with the venv module (Debian: python3-venv).
set -euo pipefail
cd "$(dirname "$0")/../.."

# KVMESH_PROFILE=debug reuses the debug build of the workspace (CI).
profile="${KVMESH_PROFILE:-release}"
if [ -n "${KVMESH_LIB:-}" ]; then
  : # the caller names the library to test
elif [ "${KVMESH_PREBUILT:-0}" = 1 ]; then
  : # the caller built the workspace already (CI: cargo build --workspace --all-targets)
elif [ "$profile" = release ]; then
  cargo build --release -p kvmesh-cabi
else
  cargo build -p kvmesh-cabi
fi
if [ -z "${KVMESH_LIB:-}" ]; then
  target="${CARGO_TARGET_DIR:-$PWD/target}"
  case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
  KVMESH_LIB="$target/$profile/libkvmesh.so"
fi
export KVMESH_LIB
test -f "$KVMESH_LIB" || { echo "ci.sh: $KVMESH_LIB not found" >&2; exit 1; }

venv="${KVMESH_CI_VENV:-$PWD/.venv-ci}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check pytest
if [ "${KVMESH_CI_VLLM:-0}" = 1 ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check --no-cache-dir vllm==0.32.0
  # The vLLM tests must run, not skip, in this mode.
  export KVMESH_REQUIRE_VLLM=1
fi
export VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1
"$venv/bin/python" -m pytest -q bindings/python/tests
