#!/usr/bin/env bash
# GPU checks of kvmesh-gpu, in two halves.
#
#   scripts/gpu-check.sh            on the build machine (no GPU needed):
#       builds the release test binaries of kvmesh-gpu (gpu_nccl.rs included),
#       the plugin's unit tests and its GPU tests (plugin/tests/gpu_prefix.rs),
#       gpu-bench and moe-bench, strips them into gpu-carry/ (gitignored,
#       < 64 MiB) and prints the command to run on the GPU machine.
#   scripts/gpu-check.sh --remote   on the GPU machine, from the repo root
#       (no Rust toolchain needed): puts libnvrtc and libnccl on
#       LD_LIBRARY_PATH, runs nvidia-smi, every test binary with
#       --include-ignored, gpu-bench, and moe-bench's NCCL baseline;
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
    cargo build --release -p kvmesh-ep --bin moe-bench
    for e in $exes; do
        # Binaries are named <target>-<hash>: unique, and the target name
        # stays readable.
        cp "$e" "$CARRY/tests/$(basename "$e")"
    done
    cp "$CARGO_TARGET_DIR/release/gpu-bench" "$CARGO_TARGET_DIR/release/xfer-bench" \
        "$CARGO_TARGET_DIR/release/moe-bench" "$CARRY/"
    strip "$CARRY"/tests/* "$CARRY"/gpu-bench "$CARRY"/xfer-bench "$CARRY"/moe-bench
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
# cudarc opens NCCL only as libnccl.so (or .so.1/.so.9-.so.12), never as
# the libnccl.so.2 that NCCL installs: give it an unversioned name. Looked
# for on LD_LIBRARY_PATH, in the usual system and CUDA directories, in
# ldconfig's cache and in a pip nvidia-nccl-cu* package.
nccl_so=""
llp=${LD_LIBRARY_PATH:-}
nccl_dirs=$(printf '%s\n' ${llp//:/ } /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64 \
    /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nccl/lib /usr/lib64 /usr/local/lib)
nccl_dirs+=$'\n'$(ldconfig -p 2>/dev/null | awk '/libnccl\.so\.2 /{print $NF}' | xargs -r -n1 dirname)
nccl_dirs+=$'\n'$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
for d in $nccl_dirs; do
    if [[ -e "$d/libnccl.so.2" ]]; then nccl_so="$d/libnccl.so.2"; break; fi
done
if [[ -n "$nccl_so" ]]; then
    links="$OUT/.nccl-links"
    mkdir -p "$links"
    ln -sf "$nccl_so" "$links/libnccl.so"
    export LD_LIBRARY_PATH="$links:$(dirname "$nccl_so"):${LD_LIBRARY_PATH:-}"
    echo "NCCL: $nccl_so (linked as $links/libnccl.so)" | tee -a "$OUT/summary.log"
else
    # The gpu_nccl tests then fail, naming the missing library.
    echo "NCCL: libnccl.so.2 not found on this machine; the NCCL tests will fail" |
        tee -a "$OUT/summary.log"
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
# moe-bench with the NCCL baseline: one rank per GPU (at most 8; NCCL
# refuses two ranks on one GPU), kvmesh rows beside it on shared memory.
if [[ -n "$nccl_so" ]]; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    ranks=$(( gpus < 1 ? 1 : (gpus > 8 ? 8 : gpus) ))
    echo "=== moe-bench --baseline nccl --ranks $ranks" | tee -a "$OUT/summary.log"
    if "$CARRY/moe-bench" --ranks "$ranks" --config tiny,v2lite --baseline nccl --iters 50 \
        --csv "$OUT/moe-bench-nccl.csv" >"$OUT/moe-bench-nccl.log" 2>&1; then
        tee -a "$OUT/summary.log" <"$OUT/moe-bench-nccl.log"
    else
        status=1
        echo "FAILED (see moe-bench-nccl.log)" | tee -a "$OUT/summary.log"
        tail -20 "$OUT/moe-bench-nccl.log" | tee -a "$OUT/summary.log"
    fi
fi
echo "exit status $status" | tee -a "$OUT/summary.log"
exit $status
