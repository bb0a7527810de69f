"""kvtier.hashing: chained block keys, salts, and vLLM-identical engine modes."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import numpy as np
import pytest
import xxhash

from kvtier.errors import ConfigError
from kvtier.hashing import (
    ENGINE_MODES,
    HASH_MODES,
    BlockHasher,
    MmItem,
    RequestKeys,
    salt_hash,
    vllm_extra_keys,
    vllm_none_hash,
)
from need import need_module

FAST_MODES = ("xxh3", "kvbm")


def tokens_of(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 150_000, size=n).tolist()


# -- salt ---------------------------------------------------------------------------------
def test_salt_hash_is_xxh3_of_kvbm_json_payload():
    assert salt_hash() == xxhash.xxh3_64_intdigest(b"{}", 0)
    assert salt_hash("tenant") == xxhash.xxh3_64_intdigest(b'{"salt":"tenant"}', 0)
    assert salt_hash(None, "ad") == xxhash.xxh3_64_intdigest(b'{"lora_name":"ad"}', 0)
    assert salt_hash("t", "ad") == xxhash.xxh3_64_intdigest(b'{"salt":"t","lora_name":"ad"}', 0)
    assert salt_hash("é") == xxhash.xxh3_64_intdigest('{"salt":"é"}'.encode(), 0)


def test_salt_hash_distinguishes_salt_from_lora():
    values = {salt_hash(), salt_hash("x"), salt_hash(None, "x"), salt_hash("x", "x"),
              salt_hash("")}
    assert len(values) == 5


# -- fast modes ---------------------------------------------------------------------------
@pytest.mark.parametrize("salt", [0, 0xDEADBEEF12345678])
@pytest.mark.parametrize("parent", [None, 99])
def test_xxh3_mode_follows_its_documented_formula(salt, parent):
    size = 4
    tokens = tokens_of(12)
    extras = [None, b"img", None]
    expected, key = [], parent or 0
    for i in range(3):
        block = struct.pack("<4I", *tokens[4 * i:4 * i + 4]) + (extras[i] or b"")
        key = xxhash.xxh3_64_intdigest(block, key ^ salt)
        expected.append(key)
    assert BlockHasher(size).hash_blocks(tokens, salt=salt, parent=parent,
                                         extra_keys=extras) == expected


def test_kvbm_mode_follows_kvbm_formula():
    size, salt = 4, salt_hash("s")
    tokens = tokens_of(12)
    expected, parent = [], None
    for i in range(3):
        block_hash = xxhash.xxh3_64_intdigest(struct.pack("<4I", *tokens[4 * i:4 * i + 4]), salt)
        parent = block_hash if parent is None else xxhash.xxh3_64_intdigest(
            struct.pack("<QQ", parent, block_hash), salt)
        expected.append(parent)
    assert BlockHasher(size, "kvbm").hash_blocks(tokens, salt=salt) == expected


@pytest.mark.parametrize("mode", HASH_MODES)
def test_only_full_blocks_are_hashed(mode):
    hasher = BlockHasher(16, mode, none_hash=b"n" * 32 if mode.startswith("xxhash") else None)
    assert hasher.hash_blocks([]) == []
    assert hasher.hash_blocks(list(range(15))) == []
    tokens = tokens_of(16 * 3 + 7)
    keys = hasher.hash_blocks(tokens)
    assert len(keys) == 3
    assert keys == hasher.hash_blocks(tokens[:48])


@pytest.mark.parametrize("mode", FAST_MODES)
def test_list_and_numpy_inputs_agree(mode):
    hasher = BlockHasher(16, mode)
    tokens = tokens_of(160)
    expected = hasher.hash_blocks(tokens, salt=7)
    assert all(isinstance(k, int) for k in expected)
    for dtype in (np.int32, np.int64, np.uint32, np.uint64):
        assert hasher.hash_blocks(np.array(tokens, dtype=dtype), salt=7) == expected
    # Non-contiguous and 2-D arrays are flattened in order.
    strided = np.zeros(2 * len(tokens), dtype=np.int64)
    strided[::2] = tokens
    assert hasher.hash_blocks(strided[::2], salt=7) == expected
    assert hasher.hash_blocks(np.array(tokens).reshape(10, 16), salt=7) == expected
    assert hasher.hash_blocks(tuple(tokens), salt=7) == expected


@pytest.mark.parametrize("mode", HASH_MODES)
@pytest.mark.parametrize("split", [1, 2, 5])
def test_hashing_in_pieces_with_parent_equals_hashing_whole(mode, split):
    hasher = BlockHasher(8, mode, none_hash=b"n" * 16 if mode.startswith("xxhash") else None)
    salt = 0 if mode in ENGINE_MODES else salt_hash("tenant")
    tokens = tokens_of(8 * 6)
    whole = hasher.hash_blocks(tokens, salt=salt)
    first = hasher.hash_blocks(tokens[:8 * split], salt=salt)
    rest = hasher.hash_blocks(tokens[8 * split:], salt=salt, parent=first[-1])
    assert first + rest == whole
    assert len(set(whole)) == 6


@pytest.mark.parametrize("mode", FAST_MODES)
def test_prefix_sharing_and_divergence(mode):
    hasher = BlockHasher(4, mode)
    a = tokens_of(16, seed=1)
    b = a[:8] + tokens_of(8, seed=2)
    ka, kb = hasher.hash_blocks(a), hasher.hash_blocks(b)
    assert ka[:2] == kb[:2]
    assert not set(ka[2:]) & set(kb[2:])
    # A change in block 0 changes every later key (the chain).
    c = [a[0] + 1] + a[1:]
    assert not set(hasher.hash_blocks(c)) & set(ka)


@pytest.mark.parametrize("mode", FAST_MODES)
def test_salt_changes_every_block_even_with_a_parent(mode):
    hasher = BlockHasher(4, mode)
    tokens = tokens_of(20)
    for parent in (None, 12345):
        one = hasher.hash_blocks(tokens, salt=salt_hash("a"), parent=parent)
        two = hasher.hash_blocks(tokens, salt=salt_hash("b"), parent=parent)
        assert not set(one) & set(two)


@pytest.mark.parametrize("mode", FAST_MODES)
def test_extra_keys_change_their_block_and_the_rest_of_the_chain(mode):
    hasher = BlockHasher(4, mode)
    tokens = tokens_of(16)
    plain = hasher.hash_blocks(tokens)
    assert hasher.hash_blocks(tokens, extra_keys=[None, b"", None, None]) == plain
    mixed = hasher.hash_blocks(tokens, extra_keys=[None, b"image-1", None, None])
    assert mixed[0] == plain[0]
    assert not set(mixed[1:]) & set(plain)
    other = hasher.hash_blocks(tokens, extra_keys=[None, b"image-2", None, None])
    assert other[1] != mixed[1]


def test_xxh3_extra_key_cannot_impersonate_a_salt():
    # Salts seed the hash while extra keys are input bytes, so an extra key equal to a
    # salt's bytes on an unsalted block does not reproduce the salted key.
    hasher = BlockHasher(4)
    tokens = tokens_of(4)
    salt = salt_hash("x")
    assert hasher.hash_blocks(tokens, salt=salt) != hasher.hash_blocks(
        tokens, extra_keys=[struct.pack("<Q", salt)])


def test_bad_inputs_are_rejected():
    with pytest.raises(ConfigError, match="hash_mode"):
        BlockHasher(16, "md5")
    with pytest.raises(ConfigError, match="block_size"):
        BlockHasher(0)
    with pytest.raises(ConfigError, match="none_hash"):
        BlockHasher(16, "xxh3", none_hash=b"x")
    hasher = BlockHasher(4)
    with pytest.raises(ValueError, match="token ids"):
        hasher.hash_blocks([1, 2, -3, 4])
    with pytest.raises(ValueError, match="token ids"):
        hasher.hash_blocks(np.array([1, 2, 2**40, 4], dtype=np.int64))
    # int32 ids are reinterpreted as uint32, as KVBM's u32 tokens are.
    assert hasher.hash_blocks(np.array([1, 2, -1, 4], dtype=np.int32)) == hasher.hash_blocks(
        [1, 2, 2**32 - 1, 4])
    with pytest.raises(ValueError, match="dtype"):
        hasher.hash_blocks(np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError, match="salt"):
        hasher.hash_blocks([1, 2, 3, 4], salt=-1)
    with pytest.raises(ValueError, match="parent"):
        hasher.hash_blocks([1, 2, 3, 4], parent=b"bytes-key")
    with pytest.raises(ValueError, match="extra_keys"):
        hasher.hash_blocks(list(range(8)), extra_keys=[None])
    engine = BlockHasher(4, "sha256_cbor")
    with pytest.raises(ConfigError, match="extra keys"):
        engine.hash_blocks([1, 2, 3, 4], salt=salt_hash("tenant"))
    with pytest.raises(ValueError, match="parent"):
        engine.hash_blocks([1, 2, 3, 4], parent=17)


def test_xxhash_engine_modes_need_a_reproducible_none_hash(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    with pytest.raises(ConfigError, match="PYTHONHASHSEED"):
        BlockHasher(16, "xxhash")
    monkeypatch.setenv("PYTHONHASHSEED", "42")
    assert BlockHasher(16, "xxhash").none_hash == xxhash.xxh3_128_digest(
        __import__("pickle").dumps("42", protocol=__import__("pickle").HIGHEST_PROTOCOL))
    with pytest.raises(ConfigError):
        vllm_none_hash("xxh3")


def test_vllm_extra_keys_layout():
    assert vllm_extra_keys(2) == [None, None]
    assert vllm_extra_keys(2, cache_salt="s") == [(("cache_salt", "s"),), None]
    assert vllm_extra_keys(1, first_block_idx=3, cache_salt="s") == [None]
    assert vllm_extra_keys(2, cache_salt="s", lora_name="l", lora_path="/p") == [
        (("lora", "l", "/p"), ("cache_salt", "s")), (("lora", "l", "/p"),)]


# -- engine modes against the installed vLLM ----------------------------------------------
@pytest.fixture(scope="module")
def vllm_utils():
    return need_module("vllm.v1.core.kv_cache_utils")


@pytest.fixture(scope="module")
def vllm_hashing():
    return need_module("vllm.utils.hashing")


@pytest.mark.parametrize("mode", ENGINE_MODES)
def test_engine_modes_equal_vllm_hash_block_tokens(mode, vllm_utils, vllm_hashing, monkeypatch):
    fn = vllm_hashing.get_hash_fn_by_name(mode)
    if mode.startswith("xxhash"):
        monkeypatch.setenv("PYTHONHASHSEED", "1234")
    vllm_utils.init_none_hash(fn)
    hasher = BlockHasher(16, mode)
    assert hasher.none_hash == vllm_utils.NONE_HASH
    tokens = np.array(tokens_of(16 * 4 + 3), dtype=np.int32)
    ours = hasher.hash_blocks(tokens)
    theirs, parent = [], None
    for i in range(4):
        parent = vllm_utils.hash_block_tokens(fn, parent, tokens[16 * i:16 * i + 16].tolist())
        theirs.append(parent)
    assert ours == theirs
    # An explicit none_hash (e.g. the engine's random one) is used as given.
    custom = BlockHasher(16, mode, none_hash=b"\x01" * 32)
    assert custom.hash_blocks(tokens)[0] == fn((b"\x01" * 32, tuple(tokens[:16].tolist()), None))


@pytest.mark.parametrize("mode", ["sha256", "sha256_cbor"])
def test_engine_mode_with_salt_and_lora_equals_vllm_request_hasher(mode, vllm_utils,
                                                                   vllm_hashing):
    fn = vllm_hashing.get_hash_fn_by_name(mode)
    vllm_utils.init_none_hash(fn)
    tokens = tokens_of(16 * 5 + 2, seed=3)
    request = SimpleNamespace(
        block_hashes=[], num_tokens=len(tokens), all_token_ids=tokens, mm_features=[],
        lora_request=SimpleNamespace(lora_name="adapter", lora_path="/loras/adapter"),
        cache_salt="tenant-7", prompt_embeds=None)
    theirs = vllm_utils.get_request_block_hasher(16, fn)(request)
    hasher = BlockHasher(16, mode)
    extra = vllm_extra_keys(5, cache_salt="tenant-7", lora_name="adapter",
                            lora_path="/loras/adapter")
    assert hasher.hash_blocks(tokens, extra_keys=extra) == theirs
    # Incrementally, as a connector does it step by step.
    head = hasher.hash_blocks(tokens[:32], extra_keys=extra[:2])
    tail = hasher.hash_blocks(tokens[32:], parent=head[-1],
                              extra_keys=vllm_extra_keys(3, first_block_idx=2,
                                                         cache_salt="tenant-7",
                                                         lora_name="adapter",
                                                         lora_path="/loras/adapter"))
    assert head + tail == theirs
    # Without the salt the keys differ from the first block on.
    assert not set(hasher.hash_blocks(tokens)) & set(theirs)


# -- multimodal items, prompt embeddings, LoRA path ----------------------------------------
def test_mm_keys_mark_every_block_an_item_overlaps_with_its_offset():
    items = (MmItem("a", 5, 20), MmItem("b", 25, 3), MmItem("c", 32, 16))
    # blocks of 16: [0,16) a@5; [16,32) a@-11 b@9; [32,48) c@0; [48,64) none
    assert vllm_extra_keys(4, mm_items=items, block_size=16) == [
        (("mm", "a", 5),), (("mm", "a", -11), ("mm", "b", 9)), (("mm", "c", 0),), None]
    # Starting further into the request gives the same keys for the same blocks.
    assert vllm_extra_keys(2, first_block_idx=1, mm_items=items, block_size=16) == [
        (("mm", "a", -11), ("mm", "b", 9)), (("mm", "c", 0),)]
    assert vllm_extra_keys(1, first_block_idx=1, cache_salt="s", lora_name="l",
                           lora_path="/p", mm_items=items, block_size=16) == [
        (("lora", "l", "/p"), ("mm", "a", -11), ("mm", "b", 9))]
    with pytest.raises(ValueError, match="block_size"):
        vllm_extra_keys(1, mm_items=items)


def test_unkeyable_reasons():
    assert RequestKeys().unkeyable_reason() is None
    assert RequestKeys(mm_items=(MmItem("a", 0, 4), MmItem("b", 4, 4))).unkeyable_reason() \
        is None
    assert RequestKeys(mm_items=(MmItem(None, 0, 4),)).unkeyable_reason() == "mm_no_identifier"
    assert RequestKeys(mm_items=(MmItem("", 0, 4),)).unkeyable_reason() == "mm_no_identifier"
    assert RequestKeys(mm_items=(MmItem("a", 8, 4), MmItem("b", 0, 4))).unkeyable_reason() \
        == "mm_positions"
    assert RequestKeys(mm_items=(MmItem("a", 0, 8), MmItem("b", 4, 4))).unkeyable_reason() \
        == "mm_positions"
    assert RequestKeys(mm_items=(MmItem("a", -1, 4),)).unkeyable_reason() == "mm_positions"
    assert RequestKeys(prompt_embeds=np.zeros((4, 8), np.float32)).unkeyable_reason() \
        == "prompt_embeds"
    assert RequestKeys(prompt_embeds=np.zeros((4, 8), np.uint8)).unkeyable_reason() is None
    assert RequestKeys(unkeyable="adapter says").unkeyable_reason() == "adapter says"


def _chain(hasher: BlockHasher, tokens, keys: RequestKeys) -> list:
    n = len(tokens) // hasher.block_size
    return hasher.hash_blocks(tokens, salt=hasher.salt_of(keys),
                              extra_keys=hasher.extra_keys(keys, 0, n))


@pytest.mark.parametrize("mode", HASH_MODES)
def test_mm_identifier_and_offset_change_the_image_blocks_and_the_rest(mode, monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    hasher = BlockHasher(16, mode)
    tokens = tokens_of(16 * 3) + [999] * 32 + tokens_of(16 * 3, seed=1)   # image at 48..80
    plain = _chain(hasher, tokens, RequestKeys())
    one = _chain(hasher, tokens, RequestKeys(mm_items=(MmItem("img-1", 48, 32),)))
    two = _chain(hasher, tokens, RequestKeys(mm_items=(MmItem("img-2", 48, 32),)))
    assert one[:3] == two[:3] == plain[:3], "blocks before the image are shared"
    assert not set(one[3:]) & set(two[3:]), "a different image shares no block from it on"
    assert not set(one[3:]) & set(plain[3:])
    assert _chain(hasher, tokens, RequestKeys(mm_items=(MmItem("img-1", 48, 32),))) == one
    # The same image one position later, over the same placeholder tokens, is other KV.
    moved = _chain(hasher, tokens, RequestKeys(mm_items=(MmItem("img-1", 49, 31),)))
    assert moved[:3] == one[:3] and moved[3] != one[3]
    # Hashed in pieces, as the leader does step by step, the keys are the same.
    keys = RequestKeys(mm_items=(MmItem("img-1", 48, 32),))
    head = hasher.hash_blocks(tokens[:64], salt=hasher.salt_of(keys),
                              extra_keys=hasher.extra_keys(keys, 0, 4))
    tail = hasher.hash_blocks(tokens[64:], salt=hasher.salt_of(keys), parent=head[-1],
                              extra_keys=hasher.extra_keys(keys, 4, 4))
    assert head + tail == one


@pytest.mark.parametrize("mode", HASH_MODES)
def test_lora_path_and_prompt_embeds_are_keyed(mode, monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    hasher = BlockHasher(16, mode)
    tokens = [0] * 64
    a = _chain(hasher, tokens, RequestKeys(lora_name="ad", lora_path="/v1"))
    b = _chain(hasher, tokens, RequestKeys(lora_name="ad", lora_path="/v2"))
    assert not set(a) & set(b), "re-pointing a LoRA name at another adapter shares nothing"
    rows = np.random.default_rng(0).integers(0, 256, size=(64, 32), dtype=np.uint8)
    other = rows.copy()
    other[40, 3] ^= 1   # one byte of the prompt's third block
    e1 = _chain(hasher, tokens, RequestKeys(prompt_embeds=rows))
    e2 = _chain(hasher, tokens, RequestKeys(prompt_embeds=other))
    assert e1[:2] == e2[:2] and not set(e1[2:]) & set(e2[2:])
    assert not set(e1) & set(_chain(hasher, tokens, RequestKeys()))


@pytest.fixture(scope="module")
def vllm_mm():
    return need_module("vllm.multimodal.inputs")


def _vllm_request(vllm_utils, vllm_mm, fn, tokens, positions, identifiers, **kw):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    features = [vllm_mm.MultiModalFeatureSpec(
        data=vllm_mm.MultiModalKwargsItem.dummy(), modality="image", identifier=ident,
        mm_position=vllm_mm.PlaceholderRange(offset=off, length=length))
        for (off, length), ident in zip(positions, identifiers)]
    sp = SamplingParams(max_tokens=4)
    sp.update_from_generation_config({}, 2)
    return Request("r", tokens, sp, pooling_params=None, mm_features=features or None,
                   block_hasher=vllm_utils.get_request_block_hasher(16, fn), **kw)


# Placeholder layouts: one item over several blocks, two in one block, one starting on a
# block boundary, one ending on one, adjacent items, an item in the partial last block.
MM_LAYOUTS = [
    [(5, 40)],
    [(2, 3), (9, 4), (16, 16), (32, 1), (33, 30)],
    [(48, 16), (64, 20), (90, 15)],
    [(0, 100)],
]


@pytest.mark.parametrize("mode", ENGINE_MODES)
@pytest.mark.parametrize("layout", MM_LAYOUTS)
def test_engine_mode_with_mm_items_equals_vllm_request_hasher(mode, layout, vllm_utils,
                                                              vllm_hashing, vllm_mm,
                                                              monkeypatch):
    from vllm.lora.request import LoRARequest

    from kvtier.connectors.vllm import _request_keys

    monkeypatch.setenv("PYTHONHASHSEED", "1234")
    fn = vllm_hashing.get_hash_fn_by_name(mode)
    vllm_utils.init_none_hash(fn)
    tokens = tokens_of(16 * 6 + 9, seed=4)
    idents = [f"sha-of-image-{i}" for i in range(len(layout))]
    for lora, salt in ((None, None), (LoRARequest("ad", 1, "/loras/ad"), "tenant")):
        request = _vllm_request(vllm_utils, vllm_mm, fn, tokens, layout, idents,
                                lora_request=lora, cache_salt=salt)
        assert len(request.block_hashes) == 6
        hasher = BlockHasher(16, mode)
        assert hasher.none_hash == vllm_utils.NONE_HASH
        keys = _request_keys(request)
        assert keys.unkeyable_reason() is None
        assert _chain(hasher, tokens, keys) == request.block_hashes
        # The per-block extra keys themselves, against vLLM's generator.
        mm_idx, theirs = 0, []
        for i in range(6):
            extra, mm_idx = vllm_utils.generate_block_hash_extra_keys(request, 16 * i,
                                                                      16 * i + 16, mm_idx)
            theirs.append(extra)
        assert hasher.extra_keys(keys, 0, 6) == theirs
        assert hasher.extra_keys(keys, 2, 4) == theirs[2:]


@pytest.mark.parametrize("mode", ["sha256", "sha256_cbor"])
def test_engine_mode_with_prompt_embeds_equals_vllm_request_hasher(mode, vllm_utils,
                                                                   vllm_hashing):
    import torch

    from kvtier.connectors.vllm import _request_keys

    fn = vllm_hashing.get_hash_fn_by_name(mode)
    vllm_utils.init_none_hash(fn)
    for dtype in (torch.float32, torch.bfloat16):
        embeds = torch.randn(16 * 3 + 5, 24, generator=torch.Generator().manual_seed(1)
                             ).to(dtype)
        request = _vllm_request(vllm_utils, pytest.importorskip("vllm.multimodal.inputs"), fn,
                                None, [], [], prompt_embeds=embeds)
        keys = _request_keys(request)
        assert keys.unkeyable_reason() is None
        hasher = BlockHasher(16, mode)
        assert _chain(hasher, list(request.all_token_ids), keys) == request.block_hashes
        assert len(request.block_hashes) == 3
