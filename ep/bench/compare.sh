#!/usr/bin/env bash
# Side-by-side: kvmesh dispatch/combine, the naive two-sided all-to-allv
# baseline (both from moe-bench) and OpenMPI MPI_Alltoallv moving the same
# deduplicated bytes (bench/mpi_alltoallv.c, matrix written by moe-bench).
# dsv3 shape, bf16, uniform routing, shared memory; 2 and 4 ranks; REPS
# repetitions; prints the medians with ratios and writes CSV to bench-out/ep/.
#
# Needs: openmpi-bin libopenmpi-dev (apt-get install -y openmpi-bin libopenmpi-dev).
# Usage: ep/bench/compare.sh            (from the repository root)
#        REPS=5 ITERS=100 RANKS="2 4" MODES="reduced per-expert" ep/bench/compare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
REPS=${REPS:-3}
ITERS=${ITERS:-50}
RANKS=${RANKS:-"2 4"}
MODES=${MODES:-"reduced per-expert"}
OUT=bench-out/ep
TARGET=${CARGO_TARGET_DIR:-target}
mkdir -p "$OUT"
command -v mpicc >/dev/null || { echo "mpicc not found: apt-get install -y openmpi-bin libopenmpi-dev" >&2; exit 1; }
cargo build --release -q -p kvmesh-ep --bin moe-bench
BENCH="$TARGET/release/moe-bench"
mpicc -O2 -o "$OUT/mpi_alltoallv" ep/bench/mpi_alltoallv.c
RAW="$OUT/raw.jsonl"
: > "$RAW"
for n in $RANKS; do
  for rep in $(seq 1 "$REPS"); do
    for mode in $MODES; do
      echo "ranks $n rep $rep: moe-bench ($mode)" >&2
      "$BENCH" --ranks "$n" --config dsv3 --dtype bf16 --routing uniform --transport shm \
        --baseline naive --expert-mode "$mode" --iters "$ITERS" --warmup 5 --json \
        --write-matrix "$OUT/matrix-$n.txt" \
        | sed "s/^{/{\"rep\":$rep,/" >> "$RAW"
    done
    echo "ranks $n rep $rep: OpenMPI" >&2
    mpirun --allow-run-as-root --oversubscribe -np "$n" --mca btl self,vader \
      "$OUT/mpi_alltoallv" "$OUT/matrix-$n.txt" "$ITERS" 5 \
      | sed "s/^{/{\"rep\":$rep,\"implementation\":\"openmpi\",/" >> "$RAW"
  done
done
python3 - "$RAW" "$OUT/compare.csv" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
groups = {}
for r in rows:
    impl = r.get("implementation", r.get("impl"))
    mode = r.get("expert_mode", "-") if impl != "openmpi" else "-"
    key = (r["ranks"], impl, mode)
    groups.setdefault(key, []).append(r)
med = {}
for key, rs in groups.items():
    m = {k: statistics.median(x[k] for x in rs)
         for k in ("dispatch_p50_us", "dispatch_p99_us", "combine_p50_us", "combine_p99_us")}
    m["n"] = len(rs)
    m["verified"] = all(x.get("verified") for x in rs)
    med[key] = m
hdr = f"{'ranks':>5} {'impl':<8} {'experts→combine':<15} {'runs':>4} {'disp p50':>9} {'disp p99':>9} {'comb p50':>9} {'comb p99':>9} {'disp/MPI':>8} {'comb/MPI':>8} {'naive/kv d':>10} {'naive/kv c':>10} {'verified':>8}"
print(hdr)
out = [hdr.split()]
csv = ["ranks,impl,expert_mode,runs,dispatch_p50_us,dispatch_p99_us,combine_p50_us,combine_p99_us,dispatch_vs_mpi,combine_vs_mpi,naive_over_kvmesh_dispatch,naive_over_kvmesh_combine,verified"]
for (n, impl, mode), m in sorted(med.items(), key=lambda kv: (kv[0][0], kv[0][1] != "kvmesh", kv[0][1], kv[0][2])):
    mpi = med.get((n, "openmpi", "-"))
    kv = med.get((n, "kvmesh", mode))
    dr = m["dispatch_p50_us"] / mpi["dispatch_p50_us"] if mpi else float("nan")
    cr = m["combine_p50_us"] / mpi["combine_p50_us"] if mpi else float("nan")
    nd = m["dispatch_p50_us"] / kv["dispatch_p50_us"] if kv and impl == "naive" else float("nan")
    nc = m["combine_p50_us"] / kv["combine_p50_us"] if kv and impl == "naive" else float("nan")
    print(f"{n:>5} {impl:<8} {mode:<15} {m['n']:>4} {m['dispatch_p50_us']:>9.1f} {m['dispatch_p99_us']:>9.1f} {m['combine_p50_us']:>9.1f} {m['combine_p99_us']:>9.1f} {dr:>8.2f} {cr:>8.2f} {nd:>10.2f} {nc:>10.2f} {str(m['verified']):>8}")
    csv.append(f"{n},{impl},{mode},{m['n']},{m['dispatch_p50_us']:.1f},{m['dispatch_p99_us']:.1f},{m['combine_p50_us']:.1f},{m['combine_p99_us']:.1f},{dr:.3f},{cr:.3f},{nd:.3f},{nc:.3f},{m['verified']}")
open(sys.argv[2], "w").write("\n".join(csv) + "\n")
print(f"(medians over runs of per-run p50/p99 in µs; ratios < 1 mean faster than OpenMPI; CSV: {sys.argv[2]})")
PY
