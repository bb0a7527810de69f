"""KV geometry and the engine's KV tensors (G1) as kvtier sees them.

``KVGeometry`` describes one KV block: layers, K/V factor, tokens per block, heads, head size,
dtype and how the engine lays it out. It is pure metadata (no torch), so the scheduler side can
size pools and compute fingerprints without importing torch.

``DeviceKV`` wraps the tensors an engine registers (vLLM ``register_kv_caches``) and reduces
every supported layout to the same thing: a list of *segments*. A segment is a dense run of bytes
that exists once per block at ``base + block_id * block_stride``; one block's payload in
G2/G3/G4 is its segments concatenated in a canonical order (layers by index, then K before V).
Gather and scatter then never care which layout the engine uses.

Supported layouts (logical axes; B = block, L = layer, KV = K/V, N = tokens, H = heads,
D = head size):

=================  ===========================================  ===============================
kind               tensors                                      who uses it
=================  ===========================================  ===============================
VLLM_CPU           per layer (B, H, N, 2*D)                      vLLM CPU backend
KV_FIRST           per layer (KV, B, N, H, D)                    vLLM CUDA flash-attn
BLOCK_FIRST        per layer (B, KV, N, H, D); MLA (B, N, D)     FlashInfer, MLA backends
CROSS_LAYER        one tensor (B, L, KV, N, H, D)                vLLM cross-layer blocks
FULLY_CONTIGUOUS   one tensor (B, L, KV, N, H*D)                 KVBM ``FullyContiguous``
TRTLLM_POOL        one tensor (B, L, KV, E), E = H*N*D           TensorRT-LLM's primary pool
=================  ===========================================  ===============================

TensorRT-LLM hands its connector one pool tensor per rank, ``[num_blocks, num_layers,
kv_factor, block_elems]``; inside ``block_elems`` the order of heads, tokens and head size is
TensorRT-LLM's own, so kvtier treats each (block, layer, K/V) slab as opaque bytes: the
geometry records ``num_kv_heads`` when the caller names it (else 1) and ``head_size`` as the
rest of the slab per token.

Within a block the physical order of the axes may differ from the logical one (vLLM's HND
stride orders); it is detected from the strides and recorded in ``KVGeometry.inner_order`` so
that payloads of different physical orders never share a fingerprint.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from kvtier.errors import LayoutError

if TYPE_CHECKING:  # torch is imported lazily: the scheduler side needs only KVGeometry.
    import torch


class LayoutKind(enum.Enum):
    VLLM_CPU = "vllm_cpu"
    KV_FIRST = "kv_first"
    BLOCK_FIRST = "block_first"
    CROSS_LAYER = "cross_layer"
    FULLY_CONTIGUOUS = "fully_contiguous"
    TRTLLM_POOL = "trtllm_pool"


# Logical axis names of one registered tensor, per layout. "X" is a packed last axis: K|V halves
# of 2*D for VLLM_CPU, H*D for FULLY_CONTIGUOUS.
_AXES: dict[LayoutKind, tuple[str, ...]] = {
    LayoutKind.VLLM_CPU: ("B", "H", "N", "X"),
    LayoutKind.KV_FIRST: ("KV", "B", "N", "H", "D"),
    LayoutKind.BLOCK_FIRST: ("B", "KV", "N", "H", "D"),
    LayoutKind.CROSS_LAYER: ("B", "L", "KV", "N", "H", "D"),
    LayoutKind.FULLY_CONTIGUOUS: ("B", "L", "KV", "N", "X"),
    LayoutKind.TRTLLM_POOL: ("B", "L", "KV", "E"),  # E: one opaque (layer, K/V) slab
}
_MLA_AXES = ("B", "N", "D")
_SINGLE_TENSOR_KINDS = (LayoutKind.CROSS_LAYER, LayoutKind.FULLY_CONTIGUOUS,
                        LayoutKind.TRTLLM_POOL)

# Element sizes of the dtypes engines use for KV, so KVGeometry needs no torch.
_DTYPE_BYTES = {
    "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "float64": 8,
}


def dtype_name(dtype: Any) -> str:
    """'bfloat16' for torch.bfloat16 (or for the string itself)."""
    return str(dtype).removeprefix("torch.")


def dtype_bytes(name: str) -> int:
    """Bytes per element of a torch dtype given by name."""
    size = _DTYPE_BYTES.get(name)
    if size is None:
        import torch  # an unusual dtype: ask torch

        torch_dtype = getattr(torch, name, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise LayoutError(f"unknown KV dtype {name!r}")
        size = torch_dtype.itemsize
    return size


@dataclass(frozen=True)
class KVGeometry:
    """The shape of one KV block, all layers; enough to size and fingerprint its payload."""

    num_layers: int
    kv_factor: int  # 2 for K and V, 1 for MLA
    block_size: int  # tokens per block
    num_kv_heads: int
    head_size: int
    dtype: str  # torch dtype name, e.g. "bfloat16"
    layout: LayoutKind
    # Physical order of the axes inside one block segment, e.g. "N.H.D" or "H.N.D" (see module
    # doc). Empty means the layout's natural order. Part of the fingerprint.
    inner_order: str = ""

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_size", "num_kv_heads", "head_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise LayoutError(f"KVGeometry.{name} must be a positive int, got {value!r}")
        if self.kv_factor not in (1, 2):
            raise LayoutError(f"KVGeometry.kv_factor must be 1 (MLA) or 2 (K and V), "
                              f"got {self.kv_factor!r}")
        if not isinstance(self.layout, LayoutKind):
            raise LayoutError(f"KVGeometry.layout must be a LayoutKind, got {self.layout!r}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        dtype_bytes(self.dtype)  # validates the name

    @property
    def dtype_bytes(self) -> int:
        return dtype_bytes(self.dtype)

    @property
    def layer_block_bytes(self) -> int:
        """Bytes of one block of one layer (K and V)."""
        return (self.kv_factor * self.block_size * self.num_kv_heads * self.head_size
                * self.dtype_bytes)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block, all layers: the payload stored in G2/G3/G4."""
        return self.layer_block_bytes * self.num_layers

    def fingerprint(self, model_id: str = "") -> int:
        """u64 naming this geometry (and model); stable across processes and machines.

        Any change of layer count, K/V factor, block size, heads, head size, dtype, layout or
        physical order inside a block (or of ``model_id``) gives another value, so a payload
        written under one geometry never loads under another.
        """
        canonical = (f"kvtier-geometry-v1|layers={self.num_layers}|kv={self.kv_factor}"
                     f"|block={self.block_size}|heads={self.num_kv_heads}|head={self.head_size}"
                     f"|dtype={self.dtype}|layout={self.layout.value}"
                     f"|inner={self.inner_order}|model={model_id}")
        return xxhash.xxh3_64_intdigest(canonical.encode())


# ---------------------------------------------------------------------------------------------
# Segments: the layout-free description of where a block's bytes live.


@dataclass(frozen=True)
class _TensorPlan:
    """How one registered tensor splits into per-block segments."""

    inner_order: str  # physical order of the in-block axes
    seg_bytes: int
    block_stride_bytes: int
    seg_offsets_bytes: tuple[int, ...]  # from the tensor's first element, canonical order


class Segments:
    """Per-block byte runs of a DeviceKV, as parallel int64 arrays (one entry per segment).

    Block ``b``'s bytes of segment ``i`` are ``nbytes[i]`` bytes at ``addr[i] + b*stride[i]``
    on the device, and go to ``payload_offset[i]`` inside the block's payload.
    """

    __slots__ = ("addr", "nbytes", "payload_offset", "stride", "tensor_idx", "tensor_offset")

    def __init__(self, addr, stride, nbytes, payload_offset, tensor_idx, tensor_offset):
        self.addr = np.asarray(addr, dtype=np.int64)
        self.stride = np.asarray(stride, dtype=np.int64)
        self.nbytes = np.asarray(nbytes, dtype=np.int64)
        self.payload_offset = np.asarray(payload_offset, dtype=np.int64)
        self.tensor_idx = np.asarray(tensor_idx, dtype=np.int64)  # which registered tensor
        self.tensor_offset = np.asarray(tensor_offset, dtype=np.int64)  # bytes from its start

    def __len__(self) -> int:
        return len(self.addr)


_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int:
    """The layer number in a vLLM layer name ("model.layers.12.self_attn.attn" -> 12)."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        raise LayoutError(f"layer {name!r}: no layer number in the name "
                          "(expected e.g. 'model.layers.0.self_attn.attn')")
    return int(match.group(1))


class DeviceKV:
    """The engine's KV tensors (G1), validated and reduced to per-block segments."""

    def __init__(self, geometry: KVGeometry, num_blocks: int, device: torch.device,
                 layer_names: list[str], tensors: list[torch.Tensor], segments: Segments):
        self.geometry = geometry
        self.num_blocks = num_blocks
        self.device = device
        self.layer_names = layer_names
        self.tensors = tensors  # kept alive: segments point into them
        self.segments = segments

    def __repr__(self) -> str:
        g = self.geometry
        return (f"DeviceKV({g.layout.name}, {self.num_blocks} blocks x {g.block_bytes} B, "
                f"{g.num_layers} layers, {g.dtype}, {len(self.segments)} segments/block, "
                f"{self.device})")

    @classmethod
    def from_tensors(cls, kv_caches: dict[str, torch.Tensor], block_size: int, *,
                     num_kv_heads: int | None = None, head_size: int | None = None,
                     layout: LayoutKind | None = None) -> DeviceKV:
        """Detect the layout of ``kv_caches`` and describe it; refuse what cannot be served.

        Per-layer dicts are ordered by the layer number in each name. A single tensor holding
        every layer (CROSS_LAYER, FULLY_CONTIGUOUS) may have any name. Raises ``LayoutError``
        naming the layer and the problem for mismatched shapes, dtypes or devices between
        layers, unknown shapes, or blocks whose bytes are not dense.
        """
        import torch

        if not kv_caches:
            raise LayoutError("no KV cache tensors were registered")
        if not isinstance(block_size, int) or block_size <= 0:
            raise LayoutError(f"block_size must be a positive int, got {block_size!r}")
        for name, tensor in kv_caches.items():
            if not isinstance(tensor, torch.Tensor):
                raise LayoutError(f"layer {name!r}: expected a torch.Tensor, got "
                                  f"{type(tensor).__name__}")

        if len(kv_caches) == 1:
            names = list(kv_caches)
        else:
            by_index: dict[int, str] = {}
            for name in kv_caches:
                idx = layer_index(name)
                if idx in by_index:
                    raise LayoutError(f"layers {by_index[idx]!r} and {name!r} share layer number "
                                      f"{idx}; one KV tensor per layer is supported")
                by_index[idx] = name
            names = [by_index[i] for i in sorted(by_index)]
        tensors = [kv_caches[n] for n in names]

        first_name, first = names[0], tensors[0]
        for name, tensor in zip(names[1:], tensors[1:]):
            if tensor.shape != first.shape:
                raise LayoutError(f"layer {name!r}: shape {tuple(tensor.shape)} differs from "
                                  f"{first_name!r} {tuple(first.shape)}")
            if tensor.dtype != first.dtype:
                raise LayoutError(f"layer {name!r}: dtype {tensor.dtype} differs from "
                                  f"{first_name!r} {first.dtype}")
            if tensor.device != first.device:
                raise LayoutError(f"layer {name!r}: device {tensor.device} differs from "
                                  f"{first_name!r} {first.device}")
        if first.device.type not in ("cpu", "cuda"):
            raise LayoutError(f"layer {first_name!r}: device {first.device} is not supported "
                              "(cpu or cuda)")

        kind = layout if layout is not None else _detect(first_name, tuple(first.shape),
                                                         block_size, len(tensors))
        if kind in _SINGLE_TENSOR_KINDS and len(tensors) != 1:
            raise LayoutError(f"{kind.name} needs one tensor holding every layer; got "
                              f"{len(tensors)} tensors")
        axes = _axes_for(kind, tuple(first.shape))
        sizes = _named_sizes(first_name, kind, axes, tuple(first.shape), block_size,
                             num_kv_heads, head_size)
        num_layers = sizes["L"] if kind in _SINGLE_TENSOR_KINDS else len(tensors)

        plans = [_plan_tensor(name, kind, axes, t) for name, t in zip(names, tensors)]
        for name, plan in zip(names[1:], plans[1:]):
            if plan != plans[0]:
                raise LayoutError(f"layer {name!r}: strides {tuple(kv_caches[name].stride())} "
                                  f"lay blocks out differently from {first_name!r} "
                                  f"{tuple(first.stride())}")
        geometry = KVGeometry(num_layers=num_layers, kv_factor=sizes["KV"],
                              block_size=block_size, num_kv_heads=sizes["H"],
                              head_size=sizes["D"], dtype=dtype_name(first.dtype), layout=kind,
                              inner_order=plans[0].inner_order)
        segments = _segments(tensors, plans)
        if int(segments.nbytes.sum()) != geometry.block_bytes:
            raise LayoutError(f"{kind.name}: segments cover {int(segments.nbytes.sum())} bytes "
                              f"per block, geometry says {geometry.block_bytes}")
        return cls(geometry, sizes["B"], first.device, names, tensors, segments)

    def block_bytes_view(self, segment: int):
        """Segment ``segment`` of every block as a (num_blocks, seg_bytes) uint8 tensor view."""
        import torch

        tensor = self.tensors[int(self.segments.tensor_idx[segment])]
        storage = tensor.untyped_storage()
        base = torch.empty(0, dtype=torch.uint8, device=tensor.device)
        base.set_(storage, 0, (storage.nbytes(),), (1,))
        offset = tensor.storage_offset() * tensor.element_size()
        offset += int(self.segments.tensor_offset[segment])
        return base.as_strided((self.num_blocks, int(self.segments.nbytes[segment])),
                               (int(self.segments.stride[segment]), 1), offset)


def _detect(name: str, shape: tuple[int, ...], block_size: int, num_tensors: int) -> LayoutKind:
    single = num_tensors == 1
    if len(shape) == 6 and shape[3] == block_size and single:
        return LayoutKind.CROSS_LAYER
    if (len(shape) == 4 and single and shape[2] in (1, 2) and shape[2] != block_size
            and shape[3] % block_size == 0):
        return LayoutKind.TRTLLM_POOL  # vLLM CPU's (B, H, N, 2*D) has N at axis 2
    if len(shape) == 4 and shape[2] == block_size and shape[3] % 2 == 0:
        return LayoutKind.VLLM_CPU
    if len(shape) == 5:
        if shape[0] == 2 and shape[2] == block_size:
            return LayoutKind.KV_FIRST
        if shape[1] in (1, 2) and shape[2] == block_size:
            return LayoutKind.BLOCK_FIRST
        if single and shape[2] in (1, 2) and shape[3] == block_size:
            return LayoutKind.FULLY_CONTIGUOUS
    if len(shape) == 3 and shape[1] == block_size:
        return LayoutKind.BLOCK_FIRST  # MLA: (B, N, D)
    raise LayoutError(
        f"layer {name!r}: cannot tell the KV layout of shape {shape} with block_size "
        f"{block_size}; expected vLLM CPU (B, H, {block_size}, 2*D), KV-first "
        f"(2, B, {block_size}, H, D), block-first (B, 2, {block_size}, H, D), MLA "
        f"(B, {block_size}, D), cross-layer (B, L, 2, {block_size}, H, D), fully contiguous "
        f"(B, L, 2, {block_size}, H*D) or a TensorRT-LLM pool (B, L, 2, H*{block_size}*D); "
        "pass layout= to choose")


def _axes_for(kind: LayoutKind, shape: tuple[int, ...]) -> tuple[str, ...]:
    if kind is LayoutKind.BLOCK_FIRST and len(shape) == 3:
        return _MLA_AXES
    return _AXES[kind]


def _named_sizes(name: str, kind: LayoutKind, axes: tuple[str, ...], shape: tuple[int, ...],
                 block_size: int, num_kv_heads: int | None,
                 head_size: int | None) -> dict[str, int]:
    if len(shape) != len(axes):
        raise LayoutError(f"layer {name!r}: {kind.name} expects {len(axes)} dims "
                          f"({', '.join(axes)}), got shape {shape}")
    sizes = dict(zip(axes, shape))
    sizes.setdefault("KV", 1)
    sizes.setdefault("H", 1)
    if kind is LayoutKind.TRTLLM_POOL:
        sizes["N"] = block_size  # tokens live inside the opaque slab
    if sizes["N"] != block_size:
        raise LayoutError(f"layer {name!r}: {kind.name} block axis of {sizes['N']} tokens, "
                          f"block_size is {block_size}")
    if sizes["KV"] not in (1, 2):
        raise LayoutError(f"layer {name!r}: K/V axis of size {sizes['KV']}, expected 1 or 2")
    if kind is LayoutKind.VLLM_CPU:
        if sizes["X"] % 2:
            raise LayoutError(f"layer {name!r}: last dim {sizes['X']} is not 2*head_size")
        sizes["KV"], sizes["D"] = 2, sizes["X"] // 2
    elif kind is LayoutKind.FULLY_CONTIGUOUS:
        heads = num_kv_heads or 1
        if sizes["X"] % heads:
            raise LayoutError(f"layer {name!r}: last dim {sizes['X']} is not "
                              f"num_kv_heads ({heads}) * head_size")
        sizes["H"], sizes["D"] = heads, sizes["X"] // heads
    elif kind is LayoutKind.TRTLLM_POOL:
        heads = num_kv_heads or 1
        if sizes["E"] % (block_size * heads):
            raise LayoutError(f"layer {name!r}: block_elems {sizes['E']} is not num_kv_heads "
                              f"({heads}) * tokens_per_block ({block_size}) * head_size")
        sizes["H"], sizes["D"] = heads, sizes["E"] // (block_size * heads)
    if num_kv_heads is not None and sizes["H"] != num_kv_heads:
        raise LayoutError(f"layer {name!r}: {sizes['H']} KV heads in the tensor, "
                          f"num_kv_heads={num_kv_heads}")
    if head_size is not None and sizes["D"] != head_size:
        raise LayoutError(f"layer {name!r}: head size {sizes['D']} in the tensor, "
                          f"head_size={head_size}")
    if sizes["B"] <= 0:
        raise LayoutError(f"layer {name!r}: no blocks (shape {shape})")
    return sizes


def _plan_tensor(name: str, kind: LayoutKind, axes: tuple[str, ...],
                 tensor: torch.Tensor) -> _TensorPlan:
    """Split ``tensor`` into dense per-block segments, or explain why it cannot be."""
    shape, strides = tuple(tensor.shape), tuple(tensor.stride())
    elem = tensor.element_size()
    b_axis = axes.index("B")
    block_stride = strides[b_axis]
    others = [(axes[i], shape[i], strides[i]) for i in range(len(axes))
              if i != b_axis and shape[i] > 1]
    # Axes with a smaller stride than the block axis are inside the block; larger ones
    # (K/V in KV_FIRST, layers in a layer-major tensor) split a block into segments.
    inner = sorted((a for a in others if a[2] < block_stride), key=lambda a: -a[2])
    outer = [a for a in others if a[2] >= block_stride]
    seg_elems = 1
    for axis_name, size, stride in reversed(inner):
        if stride != seg_elems:
            raise LayoutError(
                f"layer {name!r}: the bytes of one block are not dense (axis {axis_name} has "
                f"stride {stride}, expected {seg_elems}; shape {shape}, strides {strides})")
        seg_elems *= size
    if shape[b_axis] > 1 and block_stride < seg_elems:
        raise LayoutError(f"layer {name!r}: blocks overlap (block stride {block_stride} < "
                          f"{seg_elems} elements per block; shape {shape}, strides {strides})")
    # Outer axes must not overlap each other or the blocks.
    span = seg_elems
    for axis_name, size, stride in sorted([("B", shape[b_axis], block_stride)] + outer,
                                          key=lambda a: a[2]):
        if size > 1 and stride < span:
            raise LayoutError(f"layer {name!r}: axis {axis_name} (stride {stride}) overlaps "
                              f"other blocks; shape {shape}, strides {strides}")
        span = max(span, stride * (size - 1) + span) if size > 1 else span
    # Segments in canonical order: outer axes in logical order, last axis fastest.
    offsets = [0]
    for _axis_name, size, stride in outer:  # `outer` keeps logical axis order
        offsets = [o + i * stride * elem for o in offsets for i in range(size)]
    return _TensorPlan(inner_order=".".join(a[0] for a in inner), seg_bytes=seg_elems * elem,
                       block_stride_bytes=block_stride * elem,
                       seg_offsets_bytes=tuple(offsets))


def _segments(tensors: list[torch.Tensor], plans: list[_TensorPlan]) -> Segments:
    """Segments of all tensors in payload order, merging neighbours that are adjacent in memory
    (K then V of BLOCK_FIRST, consecutive layers of a cross-layer allocation)."""
    storages = [t.untyped_storage().data_ptr() for t in tensors]
    addr, stride, nbytes, tensor_idx, tensor_offset = [], [], [], [], []
    for t_idx, (tensor, plan) in enumerate(zip(tensors, plans)):
        for offset in plan.seg_offsets_bytes:
            start = tensor.data_ptr() + offset
            if (addr and storages[tensor_idx[-1]] == storages[t_idx]
                    and stride[-1] == plan.block_stride_bytes
                    and addr[-1] + nbytes[-1] == start):
                nbytes[-1] += plan.seg_bytes
                continue
            addr.append(start)
            stride.append(plan.block_stride_bytes)
            nbytes.append(plan.seg_bytes)
            tensor_idx.append(t_idx)
            tensor_offset.append(offset)
    payload_offset = np.concatenate(([0], np.cumsum(nbytes)[:-1])) if nbytes else []
    return Segments(addr, stride, nbytes, payload_offset, tensor_idx, tensor_offset)
