"""Layouts and reference computations shared by the tests."""

import random

import kvmesh

SHAPE = dict(block_size=4, num_kv_heads=2, head_size=8, dtype="bf16")


def make_layout(family, layers, blocks):
    if family == "flash":
        return kvmesh.Layout.vllm_flash_attn(num_layers=layers, num_blocks=blocks, **SHAPE)
    if family == "flash-hnd":
        return kvmesh.Layout.vllm_flash_attn(num_layers=layers, num_blocks=blocks, order="HND", **SHAPE)
    if family == "blocks-first":
        return kvmesh.Layout.vllm_blocks_first(num_layers=layers, num_blocks=blocks, **SHAPE)
    if family == "packed":
        return kvmesh.Layout.packed_kv(num_layers=layers, num_blocks=blocks, **SHAPE)
    if family == "trtllm":
        return kvmesh.Layout.trtllm_pool(num_layers=layers, num_blocks=blocks, **SHAPE)
    if family == "mla":
        return kvmesh.Layout.mla(num_layers=layers, num_blocks=blocks, block_size=4, latent_dim=24)
    raise ValueError(family)


def initial_regions(layout, seed):
    rng = random.Random(seed)
    return [bytearray(rng.randbytes(n)) for n in layout.region_lens()]


def expected(src_layout, src_mem, dst_layout, dst_mem, src_blocks, dst_blocks):
    """dst_mem after src_blocks land in dst_blocks, head vector by head vector."""
    out = [bytearray(m) for m in dst_mem]
    vb = src_layout.vector_bytes
    for a, b in zip(src_blocks, dst_blocks):
        for layer in range(src_layout.num_layers):
            for kv in range(src_layout.planes):
                for t in range(src_layout.block_size):
                    for h in range(src_layout.num_kv_heads):
                        sr, so = src_layout.vector_place(layer, a, kv, t, h)
                        dr, do = dst_layout.vector_place(layer, b, kv, t, h)
                        out[dr][do:do + vb] = src_mem[sr][so:so + vb]
    return out
