"""A decode worker for the push tests, in its own process.

    python decode_worker.py FAMILY LAYERS BLOCKS SEED

Registers a host KV cache filled with random bytes (seeded), prints
``DESC <hex>``, then answers commands on stdin:
``wait SECONDS`` -> ``RECEIVED <tid hex> <blocks>`` or ``NONE``;
``hash`` -> ``HASH <sha256 hex> ...`` (one per region); ``quit``.
"""

import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kvmesh  # noqa: E402
from layouts import initial_regions, make_layout  # noqa: E402


def main():
    family, layers, blocks, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    ctx = kvmesh.Context()
    layout = make_layout(family, layers, blocks)
    mem = initial_regions(layout, seed)
    cache = ctx.register_kv_cache(layout, mem)
    print("DESC", cache.export().hex(), flush=True)
    for line in sys.stdin:
        w = line.split()
        if not w or w[0] == "quit":
            break
        if w[0] == "wait":
            until = time.monotonic() + float(w[1])
            got = []
            while not got and time.monotonic() < until:
                got = ctx.poll_received(1)
                if not got:
                    time.sleep(0.001)
            if got:
                print("RECEIVED", got[0].transfer_id.hex(), got[0].blocks, flush=True)
            else:
                print("NONE", flush=True)
        elif w[0] == "hash":
            print("HASH", *[hashlib.sha256(m).hexdigest() for m in mem], flush=True)
    cache.deregister(5.0)
    ctx.close()


if __name__ == "__main__":
    main()
