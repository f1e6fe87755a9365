#!/usr/bin/env bash
# GPU checks of kvmesh-gpu, in two halves.
#
#   scripts/gpu-check.sh            on the build machine (no GPU needed):
#       builds the release test binaries of kvmesh-gpu, the plugin's unit
#       tests and its GPU tests (plugin/tests/gpu_prefix.rs) and gpu-bench, strips
#       them into gpu-carry/ (gitignored, < 64 MiB) and prints the command
#       to run on the GPU machine.
#   scripts/gpu-check.sh --remote   on the GPU machine, from the repo root
#       (no Rust toolchain needed): puts libnvrtc on LD_LIBRARY_PATH, runs
#       nvidia-smi, every test binary with --include-ignored, and gpu-bench;
#       logs go to $OUT (default gpu-out/).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=gpu-carry

if [[ "${1:-}" != "--remote" ]]; then
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-cuda}"
    rm -rf "$CARRY"
    mkdir -p "$CARRY/tests"
    json=$(cargo test --release -p kvmesh-gpu -p kvmesh-plugin --lib --tests --no-run \
        --message-format=json)
    # Every kvmesh-gpu test binary; of the plugin, its unit tests and GPU tests.
    exes=$(printf '%s\n' "$json" | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if not m.get("profile", {}).get("test"):
        continue
    pkg = m["package_id"]
    name = m["target"]["name"]
    if "kvmesh-gpu" in pkg and m["target"]["kind"] != ["bin"]:
        print(m["executable"])
    elif "kvmesh-plugin" in pkg and name in ("kvmesh_plugin", "gpu_prefix"):
        print(m["executable"])
')
    cargo build --release -p kvmesh-gpu --bin gpu-bench --bin xfer-bench
    for e in $exes; do
        # Binaries are named <target>-<hash>: unique, and the target name
        # stays readable.
        cp "$e" "$CARRY/tests/$(basename "$e")"
    done
    cp "$CARGO_TARGET_DIR/release/gpu-bench" "$CARGO_TARGET_DIR/release/xfer-bench" "$CARRY/"
    strip "$CARRY"/tests/* "$CARRY"/gpu-bench "$CARRY"/xfer-bench
    cp scripts/gpu-check.sh "$CARRY/"
    # two_process tests start xfer-bench by the absolute path baked in at
    # build time; the remote half recreates it.
    echo "$CARGO_TARGET_DIR/release/xfer-bench" > "$CARRY/xfer-bench.path"
    size=$(du -sb "$CARRY" | cut -f1)
    echo "gpu-carry: $(ls "$CARRY/tests" | wc -l) test binaries + gpu-bench, $((size / 1048576)) MiB"
    if (( size > 64 * 1048576 )); then
        echo "error: $CARRY is over 64 MiB" >&2
        exit 1
    fi
    echo "run on the GPU machine (repo root, carry gpu-carry/):"
    echo "  bash scripts/gpu-check.sh --remote    # logs and gpu-bench.{json,csv} in \$OUT"
    exit 0
fi

# ---------------------------------------------------------------- remote ---
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
if [[ ! -d "$CARRY/tests" ]]; then
    # Invoked as gpu-carry/gpu-check.sh: the carry folder is next to us.
    CARRY="$(cd "$(dirname "$0")" && pwd)"
fi
# cudarc (cuda-12080 candidates) looks for libnvrtc.so or libnvrtc.so.12;
# CUDA 13 ships libnvrtc.so.13: give it an unversioned name.
libdir=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
    if ls "$d"/libnvrtc.so* >/dev/null 2>&1; then libdir=$d; break; fi
done
if [[ -n "$libdir" ]]; then
    links="$OUT/.nvrtc-links"
    mkdir -p "$links"
    real=$(ls "$libdir"/libnvrtc.so.* 2>/dev/null | grep -v alt | sort -V | tail -1)
    if [[ ! -e "$libdir/libnvrtc.so" && -n "$real" ]]; then
        ln -sf "$real" "$links/libnvrtc.so"
    fi
    # libnvrtc-builtins is found next to libnvrtc.
    for b in "$libdir"/libnvrtc-builtins.so*; do [[ -e "$b" ]] && ln -sf "$b" "$links/"; done
    export LD_LIBRARY_PATH="$links:$libdir:${LD_LIBRARY_PATH:-}"
fi
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" | tee "$OUT/env.log"
if [[ -f "$CARRY/xfer-bench.path" ]]; then
    want=$(cat "$CARRY/xfer-bench.path")
    if [[ ! -x "$want" ]]; then
        { mkdir -p "$(dirname "$want")" && cp "$CARRY/xfer-bench" "$want"; } ||
            echo "warning: two_process tests need xfer-bench at $want" | tee -a "$OUT/env.log"
    fi
fi
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.log" || true
status=0
for t in "$CARRY"/tests/*; do
    name=$(basename "$t")
    echo "=== $name" | tee -a "$OUT/summary.log"
    if "$t" --include-ignored --test-threads=1 >"$OUT/test-$name.log" 2>&1; then
        grep -E "^test result" "$OUT/test-$name.log" | tee -a "$OUT/summary.log"
    else
        status=1
        echo "FAILED (see test-$name.log)" | tee -a "$OUT/summary.log"
        grep -E "^test .* FAILED|panicked" "$OUT/test-$name.log" | head -20 | tee -a "$OUT/summary.log"
    fi
done
if ! "$CARRY/gpu-bench" --out "$OUT" 2>&1 | tee "$OUT/gpu-bench.log"; then
    status=1
fi
echo "exit status $status" | tee -a "$OUT/summary.log"
exit $status
