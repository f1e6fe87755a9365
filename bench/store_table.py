#!/usr/bin/env python3
"""Helpers for bench/compare-store.sh (standard library only).

  store_table.py header
      print the CSV header line
  store_table.py rows --rep R --peer P [--status S] [--jsonl FILE] < output
      read one benchmark's stdout (a JSON list of rows, possibly among log lines), print one
      CSV row per element; a row that carries "api" (Mooncake) becomes peer P-API
      (mooncake-bytes, mooncake-buffer). If no JSON list is found, print one row with ok=0.
      With --jsonl, also append {"rep", "peer", "status", "rows"} to FILE.
  store_table.py table CSV
      print medians over repetitions per (op, size) and the ratios for the targets

Row schema read (that of `p2pctl bench --json` and the bench/peers/*_bench.py scripts):
  {"op": "put"|"get", "size": bytes, "p50_us", "p99_us", "gbps", "ops", "transport", ...}
Units: *_us microseconds per op; gbps = 1e9 bytes of payload per second.
"""

import argparse
import csv
import json
import math
import sys

from tablelib import fmt, median_of, ratio

FIELDS = ["rep", "peer", "op", "size", "ops", "p50_us", "p99_us", "mean_us", "gbps", "transport",
          "ok", "status", "detail"]

# column key -> peers as they appear in the CSV
COLS = [
    ("kv-tcp", "kvmesh-tcp"),
    ("kv-shm", "kvmesh-shm"),
    ("mc-bytes", "mooncake-bytes"),
    ("mc-buffer", "mooncake-buffer"),
    ("redis", "redis"),
]
MOONCAKE = ("mooncake-bytes", "mooncake-buffer")


def fmt_size(n):
    try:
        n = int(n)
    except (TypeError, ValueError):
        return str(n)
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= (1 << shift) and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def find_json_list(text):
    """The last JSON list of objects in text: whole text, then line by line from the end,
    then a pretty-printed list at the end."""
    text = text.strip()

    def ok(obj):
        return isinstance(obj, list) and all(isinstance(x, dict) for x in obj)

    if text:
        try:
            obj = json.loads(text)
            if ok(obj):
                return obj
            if isinstance(obj, dict) and ok(obj.get("results")):
                return obj["results"]
        except ValueError:
            pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            try:
                obj = json.loads(line)
                if ok(obj):
                    return obj
            except ValueError:
                continue
    start = text.rfind("\n[")
    if start >= 0:
        try:
            obj = json.loads(text[start:])
            if ok(obj):
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


DETAIL_KEYS = ("verified", "placement", "lo_bytes_per_payload", "holder_rss_growth_mib", "wrong_data",
               "redis_version", "parser", "nodes")


def cmd_rows(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rep", required=True)
    ap.add_argument("--peer", required=True)
    ap.add_argument("--status", default="0")
    ap.add_argument("--jsonl", default="")
    a = ap.parse_args(argv)
    rows = find_json_list(sys.stdin.read())
    w = csv.DictWriter(sys.stdout, fieldnames=FIELDS, lineterminator="\n")
    if a.jsonl and rows is not None:
        with open(a.jsonl, "a") as fh:
            fh.write(json.dumps({"rep": int(a.rep) if a.rep.isdigit() else a.rep, "peer": a.peer,
                                 "status": int(a.status) if a.status.lstrip("-").isdigit() else a.status,
                                 "rows": rows}) + "\n")
    if not rows:
        row = {k: "" for k in FIELDS}
        row.update(rep=a.rep, peer=a.peer, ok="0", status=a.status, detail="no JSON result")
        w.writerow(row)
        return
    for obj in rows:
        row = {k: "" for k in FIELDS}
        peer = a.peer + (f"-{obj['api']}" if obj.get("api") else "")
        op = str(obj.get("op", "")).lower()
        op = {"set": "put", "read": "get", "write": "put"}.get(op, op)
        row.update(rep=a.rep, peer=peer, op=op, size=str(obj.get("size", "")), status=a.status,
                   transport=str(obj.get("transport", "")))
        row["ops"] = str(obj.get("ops", ""))
        for k in ("p50_us", "p99_us", "mean_us", "gbps"):
            row[k] = num(obj.get(k))
        good = str(a.status) == "0" and obj.get("verified", True) is not False and row["gbps"] != ""
        row["ok"] = "1" if good else "0"
        extras = {k: obj[k] for k in DETAIL_KEYS if k in obj}
        row["detail"] = json.dumps(extras, separators=(",", ":")) if extras else ""
        w.writerow(row)


def f2(v, width=9, prec=1):
    return fmt(v, width, prec)


def cmd_table(argv):
    path = argv[0]
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    reps = sorted({r["rep"] for r in rows})

    def sel(peer, op, size):
        return [r for r in rows if r["peer"] == peer and r["op"] == op and r["size"] == str(size)]

    points = sorted({(int(r["size"]), r["op"]) for r in rows if r["size"] and r["op"]},
                    key=lambda p: (p[0], 0 if p[1] == "put" else 1))
    med = {}
    for size, op in points:
        for _, peer in COLS:
            for key in ("p50_us", "p99_us", "gbps"):
                med[(peer, op, size, key)] = median_of(sel(peer, op, size), key)

    def m(peer, op, size, key):
        return med.get((peer, op, size, key), (None, 0))[0]

    def mc_best(op, size, key):
        """Best Mooncake API for this point: lowest latency or highest GB/s; (value, api)."""
        cands = [(m(p, op, size, key), p.split("-", 1)[1]) for p in MOONCAKE if m(p, op, size, key) is not None]
        if not cands:
            return None, ""
        return (min(cands) if key.endswith("_us") else max(cands))

    present = [(c, p) for c, p in COLS if any(r["peer"] == p for r in rows)]
    print(f"\nResults from {path}: {len(reps)} repetition(s); values are medians over the successful runs "
          f"(n = how many). One client thread, sequential ops, holder in another process.")
    print("Columns: kv-tcp / kv-shm = p2pctl bench --transport tcp / shm; mc-bytes = Mooncake Store put()/get(); "
          "mc-buffer = Mooncake Store put_from()/get_into() on a registered buffer; redis = Redis SET/GET via redis-py+hiredis.")
    for title, key, prec in (("p50 latency per op, microseconds (lower is better)", "p50_us", 1),
                             ("p99 latency per op, microseconds (lower is better)", "p99_us", 1),
                             ("throughput, GB/s = 1e9 payload bytes / s of summed op time (higher is better)", "gbps", 3)):
        print(f"\n{title}")
        hdr = f"{'op':>4} {'size':>7} | " + " ".join(f"{c:>9}" for c, _ in present) + " | n(" + ",".join(
            c for c, _ in present) + ")"
        print(hdr)
        print("-" * len(hdr))
        for size, op in points:
            vals = [med.get((p, op, size, key), (None, 0)) for _, p in present]
            print(f"{op:>4} {fmt_size(size):>7} | " + " ".join(f2(v, 9, prec) for v, _ in vals) + " | "
                  + ",".join(str(n) for _, n in vals))

    print("\nTargets (ratios of medians; 'mooncake' = the better of mc-bytes and mc-buffer at that point):")

    def line(label, num_, den, target, ok_fn, den_name):
        r = ratio(num_, den)
        verdict = "-" if r is None else ("PASS" if ok_fn(r) else "FAIL")
        rs = f"{r:7.3f}" if r is not None else f"{'-':>7}"
        print(f"  {label:<44} {rs}   target {target:<8} {verdict:<4}  ({den_name})")

    small, big = 65536, 2097152
    mc_lat, mc_lat_api = mc_best("get", small, "p50_us")
    rd_lat = m("redis", "get", small, "p50_us")
    for tr in ("tcp", "shm"):
        line(f"get p50 @64KiB   kvmesh-{tr} / mooncake", m(f"kvmesh-{tr}", "get", small, "p50_us"), mc_lat,
             "<= 0.5", lambda r: r <= 0.5, f"mooncake{' ' + mc_lat_api if mc_lat_api else ''} {f2(mc_lat, 0)} us")
    for tr in ("tcp", "shm"):
        line(f"get p50 @64KiB   kvmesh-{tr} / redis", m(f"kvmesh-{tr}", "get", small, "p50_us"), rd_lat,
             "< 1", lambda r: r < 1, f"redis {f2(rd_lat, 0)} us")
    for op in ("get", "put"):
        mc_bw, mc_bw_api = mc_best(op, big, "gbps")
        kt = m("kvmesh-tcp", op, big, "gbps")
        ks = m("kvmesh-shm", op, big, "gbps")
        line(f"{op} GB/s @2MiB    kvmesh-tcp / mooncake", kt, mc_bw, ">= 2", lambda r: r >= 2,
             f"mooncake{' ' + mc_bw_api if mc_bw_api else ''} {f2(mc_bw, 0, 3)} GB/s")
        rt = ratio(kt, mc_bw)
        line(f"{op} GB/s @2MiB    kvmesh-shm / mooncake", ks, mc_bw, ">=2,>tcp",
             lambda r: r >= 2 and (rt is None or r > rt), f"mooncake{' ' + mc_bw_api if mc_bw_api else ''} {f2(mc_bw, 0, 3)} GB/s")
    print("  (kvmesh-shm target: at least 2 and above kvmesh-tcp's ratio. A '-' lacks one side: kvmesh "
          "skipped, a peer not run, or every run failed)")

    failed = [r for r in rows if r.get("ok") != "1"]
    if failed:
        print(f"\n{len(failed)} row(s) failed or gave no result:")
        for r in failed:
            print(f"  rep {r['rep']} {r['peer']} {r['op']} {fmt_size(r['size'])}: status {r['status']} {r['detail']}")
    print()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "header":
        print(",".join(FIELDS))
    elif cmd == "rows":
        cmd_rows(rest)
    elif cmd == "table":
        if not rest:
            sys.exit("usage: store_table.py table CSV")
        cmd_table(rest)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
