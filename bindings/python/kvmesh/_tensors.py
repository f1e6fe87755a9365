"""KV layouts from framework tensors (anything with ``shape``, ``stride()``,
``element_size()``, ``data_ptr()`` and ``dtype``, e.g. torch tensors), and
compact look-alike layouts with the same key fingerprint.

No import of torch here: dtypes are matched by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .core import Layout

# torch dtype names -> kvmesh dtype names
DTYPE_NAMES = {
    "torch.float32": "f32",
    "torch.float16": "f16",
    "torch.bfloat16": "bf16",
    "torch.float8_e4m3fn": "fp8_e4m3",
    "torch.float8_e5m2": "fp8_e5m2",
}

# Logical orders of the dimensions before the last (head_size) one, as the
# attention backends lay them out.
KV_ORDERS = [
    ("kv", "block", "token", "head"),  # FlashAttention, CPU: (2, N, B, H, D)
    ("block", "kv", "token", "head"),  # blocks first: (N, 2, B, H, D)
    ("kv", "block", "head", "token"),  # (2, N, H, B, D)
    ("block", "kv", "head", "token"),  # (N, 2, H, B, D)
]


def dtype_name(dtype) -> str:
    name = str(dtype)
    if name not in DTYPE_NAMES:
        raise ValueError(f"KV cache dtype {name} is not one of {sorted(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


@dataclass
class LayoutSpec:
    """Everything a Layout is made of (plain data: picklable)."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: str
    kind: str
    block_stride: int
    kv_stride: int
    token_stride: int
    head_stride: int

    def layout(self) -> Layout:
        return Layout(num_layers=self.num_layers, num_blocks=self.num_blocks,
                      block_size=self.block_size, num_kv_heads=self.num_kv_heads,
                      head_size=self.head_size, dtype=self.dtype, kind=self.kind,
                      block_stride=self.block_stride, kv_stride=self.kv_stride,
                      token_stride=self.token_stride, head_stride=self.head_stride)

    def compact(self, num_blocks: int = 1) -> "LayoutSpec":
        """The same block shape and axis order (hence the same fingerprint
        and keys) with tightly packed strides and ``num_blocks`` blocks."""
        planes = 2 if self.kind == "kv" else 1
        vec = self.head_size * {"f32": 4, "f16": 2, "bf16": 2}.get(self.dtype, 1)
        inner = [("kv", planes, self.kv_stride), ("token", self.block_size, self.token_stride),
                 ("head", self.num_kv_heads, self.head_stride)]
        # Innermost (smallest stride) first; axes of extent 1 keep stride vec.
        strides = {}
        step = vec
        for name, count, _ in sorted(inner, key=lambda a: (a[1] > 1, a[2])):
            strides[name] = step if count > 1 else vec
            if count > 1:
                step *= count
        return LayoutSpec(self.num_layers, num_blocks, self.block_size, self.num_kv_heads,
                          self.head_size, self.dtype, self.kind, step, strides["kv"],
                          strides["token"], strides["head"])


def span_bytes(t) -> int:
    """Bytes from ``t.data_ptr()`` to one past its last element."""
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    return (last + 1) * t.element_size()


def kv_layout_spec(tensors: Sequence, num_blocks: int, block_size: int, num_kv_heads: int,
                   head_size: int, latent: bool = False) -> LayoutSpec:
    """The layout of per-layer KV tensors (one tensor per layer, all of one
    shape and strides): vLLM's FlashAttention/CPU ``(2, N, B, H, D)``, its
    blocks-first and head-major variants (any strides: permuted views
    work), or MLA ``(N, B, D)`` with ``latent``."""
    if not tensors:
        raise ValueError("no KV tensors")
    t0 = tensors[0]
    for t in tensors[1:]:
        if tuple(t.shape) != tuple(t0.shape) or tuple(t.stride()) != tuple(t0.stride()):
            raise ValueError("KV tensors of different shapes or strides")
    es = t0.element_size()
    shape, stride = tuple(t0.shape), tuple(t0.stride())
    if shape[-1] != head_size or stride[-1] != 1:
        raise ValueError(f"the last dimension must be head_size={head_size} and contiguous, "
                         f"got shape {shape} strides {stride}")
    dt = dtype_name(t0.dtype)
    if latent:
        if shape[:-1] != (num_blocks, block_size):
            raise ValueError(f"MLA KV tensor shape {shape} is not ({num_blocks}, {block_size}, "
                             f"{head_size})")
        return LayoutSpec(len(tensors), num_blocks, block_size, 1, head_size, dt, "latent",
                          stride[0] * es, stride[0] * es, stride[1] * es, head_size * es)
    size = {"kv": 2, "block": num_blocks, "token": block_size, "head": num_kv_heads}
    for order in KV_ORDERS:
        if len(shape) == 5 and all(shape[i] == size[a] for i, a in enumerate(order)):
            st = {a: stride[i] * es for i, a in enumerate(order)}
            return LayoutSpec(len(tensors), num_blocks, block_size, num_kv_heads, head_size, dt,
                              "kv", st["block"], st["kv"], st["token"], st["head"])
    raise ValueError(f"KV tensor shape {shape} matches no known layout for {num_blocks} blocks "
                     f"of {block_size} tokens, {num_kv_heads} KV heads of {head_size}")
