"""The peer store through the Python bindings, against the real library:
a store peer and a worker in one process, save / lookup / layer-by-layer
load with byte checks, keys, small objects and statistics."""

import pytest

import kvmesh
from layouts import expected, initial_regions, make_layout


@pytest.fixture(scope="module")
def swarm():
    holder = kvmesh.StoreContext(mem_bytes=32 << 20)
    worker = kvmesh.StoreContext(bootstrap=holder.addrs, op_timeout=10.0)
    worker.wait_members(1, 10.0)
    yield holder, worker
    worker.close()
    holder.close()


NS = kvmesh.Namespace("py-test-model")


def tokens(seed, n):
    return [(i * 2654435761 + seed) % 50000 for i in range(n)]


@pytest.mark.parametrize("family", ["flash", "flash-hnd", "trtllm", "mla"])
def test_save_lookup_and_load_layer_by_layer(swarm, family):
    _, worker = swarm
    layout = make_layout(family, 3, 12)
    mem = initial_regions(layout, 11)
    cache = worker.register_kv_cache(layout, mem)
    keys = layout.token_keys(NS, tokens(hash(family) % 1000, 5 * layout.block_size + 1))
    assert len(keys) == 5 and all(len(k) == 32 for k in keys)

    src = [7, 2, 9, 0]
    op = cache.save(src, keys[:4], per_layer=True)
    for layer in range(3):
        op.save_layer(layer)
    res = op.wait(10.0)
    assert res is not None and res.ok, res
    block_bytes = (layout.num_layers * layout.planes * layout.block_size * layout.num_kv_heads
                   * layout.vector_bytes)
    assert res.bytes == 4 * block_bytes and res.failed == []

    before = [bytes(m) for m in mem]
    with cache.lookup(keys, lease=10.0) as found:
        assert found.count == 4 and found.keys == keys[:4]
        dst = [11, 3, 5]
        op = found.load(dst, first=1)
        for layer in range(3):
            assert op.layer_ready(layer, 10.0)
        res = op.wait(10.0)
        assert res.ok, res
    assert [bytes(m) for m in mem] == [bytes(m) for m in expected(layout, before, layout, before,
                                                                    src[1:], dst)]
    # Saving them again sends nothing new.
    res = cache.save(src, keys[:4]).wait(10.0)
    assert res.ok and res.bytes == 0
    cache.deregister()


def test_keys_misses_objects_and_stats(swarm):
    holder, worker = swarm
    layout = make_layout("flash", 2, 8)
    cache = worker.register_kv_cache(layout, initial_regions(layout, 3))
    t = tokens(5, 4 * layout.block_size)
    keys = layout.token_keys(NS, t)
    assert keys == layout.token_keys(NS, t + [1, 2])  # a partial block has no key
    assert keys != layout.token_keys(kvmesh.Namespace("py-test-model", tp_rank=1), t)
    hk = layout.hash_keys(NS, [b"\x01" * 32, b"\x02" * 32])
    assert len(hk) == 2 and hk[0] not in keys
    with pytest.raises(ValueError):
        layout.hash_keys(NS, [b"a", b"bb"])

    with cache.lookup(keys) as found:
        assert found.count == 0
        with pytest.raises(kvmesh.InvalidArgument, match="a lookup that found 0"):
            found.load([0])

    worker.put(b"\x05" * 32, b"transfer plan")
    assert worker.get(b"\x05" * 32) == b"transfer plan"
    assert holder.get(b"\x05" * 32) == b"transfer plan"
    assert worker.get(b"\x06" * 32) is None
    big = bytes(range(256)) * 64
    worker.put(b"\x07" * 32, big)
    assert worker.get(b"\x07" * 32) == big

    s = worker.store_stats()
    assert s["peers_alive"] == 1 and s["capacity"] == 0 and s["lookups"] >= 1
    assert holder.store_stats()["capacity"] == 32 << 20
    with pytest.raises(kvmesh.OutOfRange, match="source block 8"):
        cache.save([8], keys[:1])
    with pytest.raises(kvmesh.InvalidArgument, match="no peer store"):
        with kvmesh.Context() as plain:
            c = plain.register_kv_cache(layout, initial_regions(layout, 1))
            c.lookup(keys)
