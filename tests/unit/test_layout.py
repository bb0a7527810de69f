"""KV geometry, layout detection and refusal of tensors kvtier cannot serve."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kvtier.errors import LayoutError
from kvtier.layout import DeviceKV, KVGeometry, LayoutKind, layer_index

L, NB, BS, H, D = 3, 6, 16, 2, 8


def per_layer(shape, n=L, dtype=torch.bfloat16, names=None):
    names = names or [f"model.layers.{i}.self_attn.attn" for i in range(n)]
    return {name: torch.zeros(shape, dtype=dtype) for name in names}


CASES = {
    LayoutKind.VLLM_CPU: lambda: per_layer((NB, H, BS, 2 * D)),
    LayoutKind.KV_FIRST: lambda: per_layer((2, NB, BS, H, D)),
    LayoutKind.BLOCK_FIRST: lambda: per_layer((NB, 2, BS, H, D)),
    LayoutKind.CROSS_LAYER: lambda: {"kv": torch.zeros(NB, L, 2, BS, H, D,
                                                       dtype=torch.bfloat16)},
    LayoutKind.FULLY_CONTIGUOUS: lambda: {"kv": torch.zeros(NB, L, 2, BS, H * D,
                                                            dtype=torch.bfloat16)},
}


@pytest.mark.parametrize("kind", list(CASES))
def test_detects_each_layout_and_its_geometry(kind):
    dev = DeviceKV.from_tensors(CASES[kind](), BS, num_kv_heads=H, head_size=D)
    g = dev.geometry
    assert g.layout is kind
    assert (g.num_layers, g.kv_factor, g.block_size, g.num_kv_heads, g.head_size, g.dtype) == (
        L, 2, BS, H, D, "bfloat16")
    assert g.layer_block_bytes == 2 * BS * H * D * 2
    assert g.block_bytes == L * g.layer_block_bytes
    assert dev.num_blocks == NB
    assert int(dev.segments.nbytes.sum()) == g.block_bytes


def test_vllm_cpu_layout_matches_what_the_cpu_backend_allocates():
    # ENVIRONMENT.md §4: (num_blocks, num_kv_heads, block_size, 2*head_size), contiguous.
    kv = per_layer((64, 2, 32, 64), n=2)
    dev = DeviceKV.from_tensors(kv, 32)
    assert dev.geometry.layout is LayoutKind.VLLM_CPU
    assert (dev.geometry.num_kv_heads, dev.geometry.head_size) == (2, 32)
    assert dev.geometry.layer_block_bytes == 8192  # one 8 KiB slab per block and layer
    assert len(dev.segments) == 2  # one dense segment per layer


def test_mla_is_block_first_with_one_kv_plane():
    dev = DeviceKV.from_tensors(per_layer((NB, BS, 576)), BS)
    assert dev.geometry.kv_factor == 1
    assert dev.geometry.block_bytes == L * BS * 576 * 2


def test_segments_merge_when_adjacent_in_memory():
    kv_first = DeviceKV.from_tensors(CASES[LayoutKind.KV_FIRST](), BS)
    block_first = DeviceKV.from_tensors(CASES[LayoutKind.BLOCK_FIRST](), BS)
    cross = DeviceKV.from_tensors(CASES[LayoutKind.CROSS_LAYER](), BS)
    assert len(kv_first.segments) == 2 * L  # K and V planes are far apart
    assert len(block_first.segments) == L  # K and V of a block are adjacent
    assert len(cross.segments) == 1  # the whole block is one run


def test_per_layer_views_of_a_cross_layer_allocation_are_one_segment():
    big = torch.zeros(NB, L, 2, BS, H, D, dtype=torch.float16)
    kv = {f"model.layers.{i}.attn": big[:, i].transpose(0, 1) for i in range(L)}  # (2,B,N,H,D)
    dev = DeviceKV.from_tensors(kv, BS)
    assert dev.geometry.layout is LayoutKind.KV_FIRST
    assert len(dev.segments) == 1
    assert int(dev.segments.stride[0]) == L * 2 * BS * H * D * 2


def test_hnd_stride_order_is_accepted_and_fingerprinted_differently():
    nhd = per_layer((2, NB, BS, H, D))
    hnd = {n: torch.zeros(2, NB, H, BS, D, dtype=torch.bfloat16).transpose(2, 3) for n in nhd}
    g_nhd = DeviceKV.from_tensors(nhd, BS).geometry
    g_hnd = DeviceKV.from_tensors(hnd, BS).geometry
    assert g_nhd.block_bytes == g_hnd.block_bytes
    assert g_nhd.inner_order != g_hnd.inner_order
    assert g_nhd.fingerprint() != g_hnd.fingerprint()


def test_layers_sorted_by_number_not_by_name():
    names = [f"model.layers.{i}.attn" for i in (10, 2, 1)]
    kv = per_layer((NB, H, BS, 2 * D), names=names)
    dev = DeviceKV.from_tensors(kv, BS)
    assert dev.layer_names == ["model.layers.1.attn", "model.layers.2.attn",
                               "model.layers.10.attn"]
    assert [t.data_ptr() for t in dev.tensors] == [kv[n].data_ptr() for n in dev.layer_names]
    # The payload starts with layer 1, ends with layer 10.
    assert int(dev.segments.addr[0]) == kv["model.layers.1.attn"].data_ptr()
    assert int(dev.segments.addr[-1]) == kv["model.layers.10.attn"].data_ptr()


def test_layer_index():
    assert layer_index("model.layers.12.self_attn.attn") == 12
    assert layer_index("layers.3") == 3
    with pytest.raises(LayoutError, match="no layer number"):
        layer_index("model.attn")


@pytest.mark.parametrize("mutate, message", [
    (lambda kv: kv.__setitem__("model.layers.1.self_attn.attn",
                               torch.zeros(NB + 1, H, BS, 2 * D, dtype=torch.bfloat16)),
     "layers.1.*shape"),
    (lambda kv: kv.__setitem__("model.layers.2.self_attn.attn",
                               torch.zeros(NB, H, BS, 2 * D, dtype=torch.float16)),
     "layers.2.*dtype"),
    (lambda kv: kv.__setitem__("model.layers.2.self_attn.attn",
                               torch.zeros(NB, H, BS, 2 * D, dtype=torch.bfloat16,
                                           device="meta")),
     "layers.2.*device"),
    (lambda kv: kv.__setitem__("model.layers.1.self_attn.attn",
                               torch.zeros(NB, H, BS, 4 * D, dtype=torch.bfloat16)[..., :2 * D]),
     "layers.1.*(not dense|shape|strides)"),
    (lambda kv: kv.__setitem__("model.layers.1.attn.dup",
                               torch.zeros(NB, H, BS, 2 * D, dtype=torch.bfloat16)),
     "share layer number 1"),
])
def test_refuses_mismatched_layers(mutate, message):
    kv = per_layer((NB, H, BS, 2 * D))
    mutate(kv)
    with pytest.raises(LayoutError, match=message):
        DeviceKV.from_tensors(kv, BS)


def test_refuses_non_dense_blocks():
    base = torch.zeros(NB, H, BS, 4 * D, dtype=torch.bfloat16)
    kv = {f"model.layers.{i}.attn": base[..., :2 * D] for i in range(2)}
    with pytest.raises(LayoutError, match="not dense"):
        DeviceKV.from_tensors(kv, BS)


def test_refuses_overlapping_blocks():
    one = torch.zeros(1, H, BS, 2 * D, dtype=torch.bfloat16)
    kv = {"model.layers.0.attn": one.expand(NB, H, BS, 2 * D)}
    with pytest.raises(LayoutError, match="overlap"):
        DeviceKV.from_tensors(kv, BS)


def test_refuses_unknown_shapes_and_wrong_sizes():
    with pytest.raises(LayoutError, match="cannot tell the KV layout"):
        DeviceKV.from_tensors(per_layer((NB, 7)), BS)
    with pytest.raises(LayoutError, match="head size"):
        DeviceKV.from_tensors(per_layer((NB, H, BS, 2 * D)), BS, head_size=D + 1)
    with pytest.raises(LayoutError, match="KV heads"):
        DeviceKV.from_tensors(per_layer((NB, H, BS, 2 * D)), BS, num_kv_heads=H + 1)
    with pytest.raises(LayoutError, match="no KV cache"):
        DeviceKV.from_tensors({}, BS)
    with pytest.raises(LayoutError, match="one tensor holding every layer"):
        DeviceKV.from_tensors(per_layer((NB, L, 2, BS, H, D)), BS,
                              layout=LayoutKind.CROSS_LAYER)


def geometry(**changes):
    fields = {"num_layers": 32, "kv_factor": 2, "block_size": 16, "num_kv_heads": 8, "head_size": 128,
                  "dtype": "bfloat16", "layout": LayoutKind.CROSS_LAYER}
    fields.update(changes)
    return KVGeometry(**fields)


def test_block_bytes_of_a_realistic_geometry():
    assert geometry().block_bytes == 2 * 1024 * 1024  # 32 x 2 x 16 x 8 x 128 x bf16


@pytest.mark.parametrize("change", [
    {"num_layers": 31}, {"kv_factor": 1}, {"block_size": 32}, {"num_kv_heads": 4},
    {"head_size": 64}, {"dtype": "float16"}, {"layout": LayoutKind.KV_FIRST},
    {"inner_order": "H.N.D"},
])
def test_fingerprint_differs_for_any_change(change):
    assert geometry().fingerprint() != geometry(**change).fingerprint()


def test_fingerprint_depends_on_model_and_is_u64():
    fp = geometry().fingerprint("llama")
    assert fp != geometry().fingerprint("mistral")
    assert 0 <= fp < 2 ** 64


def test_fingerprint_is_stable_across_processes():
    code = ("from kvtier.layout import KVGeometry, LayoutKind;"
            "print(KVGeometry(32, 2, 16, 8, 128, 'bfloat16', LayoutKind.CROSS_LAYER)"
            ".fingerprint('m'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert int(out.stdout) == geometry().fingerprint("m")


def test_geometry_validates_fields():
    with pytest.raises(LayoutError, match="kv_factor"):
        geometry(kv_factor=3)
    with pytest.raises(LayoutError, match="num_layers"):
        geometry(num_layers=0)
    with pytest.raises(LayoutError, match="unknown KV dtype"):
        geometry(dtype="complex_nonsense")
    assert geometry(dtype=torch.float16).dtype == "float16"


def test_trtllm_pool_is_one_tensor_of_opaque_layer_slabs():
    # TensorRT-LLM's primary pool: (num_blocks, num_layers, kv_factor, block_elems), with
    # block_elems = KV heads x tokens_per_block x head size of one rank.
    pool = torch.arange(NB * L * 2 * H * BS * D, dtype=torch.float32).to(torch.bfloat16)
    pool = pool.reshape(NB, L, 2, H * BS * D)
    dev = DeviceKV.from_tensors({"trtllm_kv_pool": pool}, BS)
    g = dev.geometry
    assert g.layout is LayoutKind.TRTLLM_POOL
    assert (g.num_layers, g.kv_factor, g.block_size) == (L, 2, BS)
    assert g.block_bytes == L * 2 * H * BS * D * 2 == pool[0].numel() * pool.element_size()
    assert dev.num_blocks == NB
    assert len(dev.segments) == 1  # a whole block is one run of bytes
    view = dev.block_bytes_view(0)
    assert torch.equal(view[3], pool[3].contiguous().view(torch.uint8).reshape(-1))
    # Heads named: the slab splits into heads x head size; without, heads count as 1.
    named = DeviceKV.from_tensors({"pool": pool}, BS, num_kv_heads=H).geometry
    assert (named.num_kv_heads, named.head_size) == (H, D)
    assert (g.num_kv_heads, g.head_size) == (1, H * D)
    # K-only pools (kv_factor 1) are accepted too.
    k_only = DeviceKV.from_tensors({"pool": torch.zeros(NB, L, 1, BS * D)}, BS).geometry
    assert k_only.kv_factor == 1 and k_only.layout is LayoutKind.TRTLLM_POOL


def test_trtllm_pool_fingerprint_differs_from_other_layouts_of_the_same_bytes():
    pool = DeviceKV.from_tensors({"pool": torch.zeros(NB, L, 2, BS * H * D)}, BS,
                                 num_kv_heads=H).geometry
    fully = DeviceKV.from_tensors({"kv": torch.zeros(NB, L, 2, BS, H * D)}, BS,
                                  num_kv_heads=H).geometry
    assert pool.block_bytes == fully.block_bytes
    assert pool.fingerprint() != fully.fingerprint()


def test_trtllm_pool_refuses_what_it_cannot_serve():
    with pytest.raises(LayoutError, match="block_elems"):
        DeviceKV.from_tensors({"pool": torch.zeros(NB, L, 2, BS * D)}, BS, num_kv_heads=3,
                              layout=LayoutKind.TRTLLM_POOL)
    with pytest.raises(LayoutError, match="one tensor holding every layer"):
        DeviceKV.from_tensors(per_layer((NB, L, 2, BS * D)), BS, layout=LayoutKind.TRTLLM_POOL)
    # A pool whose blocks are not dense (a strided slice of a bigger allocation) is refused.
    big = torch.zeros(NB, L, 2, 2 * BS * D)
    with pytest.raises(LayoutError, match="not dense"):
        DeviceKV.from_tensors({"pool": big[..., :BS * D]}, BS)
