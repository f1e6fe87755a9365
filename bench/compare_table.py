#!/usr/bin/env python3
"""Helpers for bench/compare-xfer.sh (standard library only).

  compare_table.py header
      print the CSV header line
  compare_table.py row --rep R --peer P --mode M [--op OP] [--block B] [--batch N] [--status S] < output
      read a benchmark's stdout (one JSON object, possibly among log lines), print one CSV row
      (prints a row with ok=0 when no JSON object with "gbps" can be found)
  compare_table.py table CSV
      print medians over repetitions and the ratios between kvmesh and the peers

Units: gbps is 1e9 bytes/s of payload; *_us are microseconds; ops_per_s counts blocks.
"""

import argparse
import csv
import json
import math
import sys

from tablelib import fmt, median_of, ratio

FIELDS = [
    "rep", "peer", "mode", "op", "block", "batch",
    "gbps", "ops_per_s", "batch_p50_us", "batch_p99_us", "batch_mean_us",
    "ok", "status", "detail",
]


def fmt_block(n):
    try:
        n = int(n)
    except (TypeError, ValueError):
        return str(n)
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= (1 << shift) and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def find_json(text):
    """Last JSON object in text: whole text first, then line by line from the end."""
    text = text.strip()
    if text:
        try:
            obj = json.loads(text)
            if isinstance(obj, dict):
                return obj
        except ValueError:
            pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                obj = json.loads(line)
                if isinstance(obj, dict):
                    return obj
            except ValueError:
                continue
    # a pretty-printed object at the end of the output
    start = text.rfind("\n{")
    if start >= 0:
        try:
            obj = json.loads(text[start:])
            if isinstance(obj, dict):
                return obj
        except ValueError:
            pass
    return None


def num(v):
    if v is None or v == "":
        return ""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return ""
    if math.isnan(f) or math.isinf(f):
        return ""
    return repr(round(f, 4))


def cmd_row(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rep", required=True)
    ap.add_argument("--peer", required=True)
    ap.add_argument("--mode", required=True)
    ap.add_argument("--op", default="")
    ap.add_argument("--block", default="")
    ap.add_argument("--batch", default="")
    ap.add_argument("--status", default="0")
    a = ap.parse_args(argv)
    obj = find_json(sys.stdin.read())
    row = {k: "" for k in FIELDS}
    row.update(rep=a.rep, peer=a.peer, mode=a.mode, op=a.op, block=a.block, batch=a.batch, status=a.status)
    if obj is None or obj.get("gbps") in (None, ""):
        row["ok"] = "0"
        row["detail"] = "no JSON result"
    else:
        row["ok"] = "1" if str(a.status) == "0" and obj.get("verified", True) is not False else "0"
        for k in ("gbps", "ops_per_s", "batch_p50_us", "batch_p99_us"):
            row[k] = num(obj.get(k))
        if row["batch_p50_us"] == "" and obj.get("p50_us") is not None:
            row["batch_p50_us"] = num(obj.get("p50_us"))
        if row["batch_p99_us"] == "" and obj.get("p99_us") is not None:
            row["batch_p99_us"] = num(obj.get("p99_us"))
        batch = obj.get("batch") or a.batch
        ops = obj.get("ops_per_s")
        try:
            if ops and batch:
                row["batch_mean_us"] = num(1e6 * float(batch) / float(ops))
        except (TypeError, ValueError, ZeroDivisionError):
            pass
        for k in ("block", "batch", "op"):
            if row[k] == "" and obj.get(k) is not None:
                row[k] = str(obj[k])
        extras = {k: obj[k] for k in ("ucx_proto", "te_reported", "batches", "iters", "retransmits", "verified")
                  if k in obj}
        row["detail"] = json.dumps(extras, separators=(",", ":")) if extras else ""
    w = csv.DictWriter(sys.stdout, fieldnames=FIELDS, lineterminator="\n")
    w.writerow(row)


def f2(v, width=8, prec=2):
    return fmt(v, width, prec)


def cmd_table(argv):
    path = argv[0]
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    reps = sorted({r["rep"] for r in rows})

    def sel(peer, mode, op=None, block=None):
        return [r for r in rows if r["peer"] == peer and r["mode"] == mode
                and (op is None or r["op"] == op) and (block is None or r["block"] == str(block))]

    iperf, n_iperf = median_of(sel("iperf3", "stream"), "gbps")
    points = []
    for r in rows:
        if r["mode"] == "bw" and r["block"] and (int(r["block"]), r["op"]) not in points:
            points.append((int(r["block"]), r["op"]))
    points.sort(key=lambda p: (p[0], p[1]))

    print(f"\nResults from {path}: {len(reps)} repetition(s); values are medians over the successful ones "
          f"(n = how many of them succeeded).")
    print("Throughput in GB/s (1e9 bytes/s of payload). Ratios are ratios of medians; above 1 means kvmesh is faster.")
    print(f"iperf3 single-stream loopback TCP: {f2(iperf, 0)} GB/s (n={n_iperf})\n")

    hdr = (f"{'block':>6} {'op':>5} | {'iperf3':>7} {'mc-tcp':>7} {'kv-tcp':>7} {'kv/iperf':>8} {'kv/mc':>6} | "
           f"{'nixl':>7} {'kv-shm':>7} {'kv/nixl':>7} | n(mc,kt,nx,ks)")
    print(hdr)
    print("-" * len(hdr))
    for block, op in points:
        mc, n_mc = median_of(sel("mooncake-tcp", "bw", op, block), "gbps")
        kt, n_kt = median_of(sel("kvmesh-tcp", "bw", op, block), "gbps")
        nx, n_nx = median_of(sel("nixl-ucx", "bw", op, block), "gbps")
        ks, n_ks = median_of(sel("kvmesh-shm", "bw", op, block), "gbps")
        print(f"{fmt_block(block):>6} {op:>5} | {f2(iperf, 7)} {f2(mc, 7)} {f2(kt, 7)} {f2(ratio(kt, iperf), 8)} "
              f"{f2(ratio(kt, mc), 6)} | {f2(nx, 7)} {f2(ks, 7)} {f2(ratio(ks, nx), 7)} | "
              f"{n_mc},{n_kt},{n_nx},{n_ks}")

    print("\nPer-batch time in microseconds (batch of 32 blocks, post to completion): p50 "
          "(mooncake: mean = duration / batches, its tool reports no percentiles)")
    hdr2 = (f"{'block':>6} {'op':>5} | {'mc-tcp mean':>11} {'kv-tcp p50':>10} {'kv-tcp p99':>10} | "
            f"{'nixl p50':>9} {'nixl p99':>9} {'kv-shm p50':>10} {'kv-shm p99':>10}")
    print(hdr2)
    print("-" * len(hdr2))
    for block, op in points:
        mcm, _ = median_of(sel("mooncake-tcp", "bw", op, block), "batch_mean_us")
        kt50, _ = median_of(sel("kvmesh-tcp", "bw", op, block), "batch_p50_us")
        kt99, _ = median_of(sel("kvmesh-tcp", "bw", op, block), "batch_p99_us")
        nx50, _ = median_of(sel("nixl-ucx", "bw", op, block), "batch_p50_us")
        nx99, _ = median_of(sel("nixl-ucx", "bw", op, block), "batch_p99_us")
        ks50, _ = median_of(sel("kvmesh-shm", "bw", op, block), "batch_p50_us")
        ks99, _ = median_of(sel("kvmesh-shm", "bw", op, block), "batch_p99_us")
        print(f"{fmt_block(block):>6} {op:>5} | {f2(mcm, 11, 1)} {f2(kt50, 10, 1)} {f2(kt99, 10, 1)} | "
              f"{f2(nx50, 9, 1)} {f2(nx99, 9, 1)} {f2(ks50, 10, 1)} {f2(ks99, 10, 1)}")

    lat_points = sorted({(int(r["block"]), r["op"]) for r in rows if r["mode"] == "lat" and r["block"]})
    if lat_points:
        print("\nSingle-block latency in microseconds (batch 1, post to completion); "
              "kv/nixl below 1 means kvmesh is faster")
        hdr3 = (f"{'block':>6} {'op':>5} | {'nixl p50':>9} {'nixl p99':>9} | {'kv-shm p50':>10} {'kv-shm p99':>10} | "
                f"{'kv/nixl p50':>11} {'kv/nixl p99':>11} | n(nx,ks)")
        print(hdr3)
        print("-" * len(hdr3))
        for block, op in lat_points:
            n50, n_n = median_of(sel("nixl-ucx", "lat", op, block), "batch_p50_us")
            n99, _ = median_of(sel("nixl-ucx", "lat", op, block), "batch_p99_us")
            k50, n_k = median_of(sel("kvmesh-shm", "lat", op, block), "batch_p50_us")
            k99, _ = median_of(sel("kvmesh-shm", "lat", op, block), "batch_p99_us")
            print(f"{fmt_block(block):>6} {op:>5} | {f2(n50, 9)} {f2(n99, 9)} | {f2(k50, 10)} {f2(k99, 10)} | "
                  f"{f2(ratio(k50, n50), 11)} {f2(ratio(k99, n99), 11)} | {n_n},{n_k}")

    failed = [r for r in rows if r.get("ok") != "1"]
    if failed:
        print(f"\n{len(failed)} run(s) failed or gave no result:")
        for r in failed:
            print(f"  rep {r['rep']} {r['peer']} {r['mode']} {r['op']} {fmt_block(r['block'])}: "
                  f"status {r['status']} {r['detail']}")
    print()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "header":
        print(",".join(FIELDS))
    elif cmd == "row":
        cmd_row(rest)
    elif cmd == "table":
        if not rest:
            sys.exit("usage: compare_table.py table CSV")
        cmd_table(rest)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
