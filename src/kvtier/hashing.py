"""Chained block hashing: a block's key names its tokens, every token before it, and its salt.

Only full blocks are hashed. Tokens are taken as little-endian uint32 words, from a Python
sequence or a numpy integer array (int32 is reinterpreted as uint32 without a copy; other
dtypes are range-checked).

Modes (``BlockHasher(mode=...)``):

``"xxh3"`` (default, kvtier's own, ``int`` keys)
    ``key_i = xxh3_64(tokens_i ‖ extra_i, seed=key_{i-1} XOR salt)`` where ``tokens_i`` is
    the block's 4*block_size token bytes, ``extra_i`` its optional extra key bytes
    (multimodal), ``salt`` the 64-bit salt and ``key_{-1}`` the parent key, or 0 for the first
    block of a sequence. The salt seeds every block (so two salts never share a key, even
    continuing from the same parent) and the chain runs through the seed: one xxh3 call per
    block, no copy of the tokens, the fastest chain Python can drive.
``"kvbm"`` (``int`` keys)
    Dynamo KVBM's formula (``lib/llm/src/tokens.rs``): ``BlockHash = xxh3_64(tokens, seed=salt)``;
    ``SequenceHash = BlockHash`` for the first block of a sequence, else
    ``xxh3_64(u64le(parent) ‖ u64le(BlockHash), seed=salt)``. Extra key bytes are appended to
    the token bytes. Slower than ``"xxh3"`` (two xxh3 calls per block).
``"sha256"``, ``"sha256_cbor"``, ``"xxhash"``, ``"xxhash_cbor"`` (``bytes`` keys)
    vLLM's own prefix-cache hashes for the same ``--prefix-caching-hash-algo`` value, so that
    kvtier's keys and KV events agree with the engine's. The first block's parent is vLLM's
    ``NONE_HASH``; salts are not integers there but extra keys (see ``vllm_extra_keys``).

``salt_hash(cache_salt, lora_name)`` gives the integer salt for the ``xxh3``/``kvbm`` modes
(KVBM's SaltHash), so requests of different tenants or adapters never share a block.

What else a request's KV depends on travels in a ``RequestKeys``, and
``BlockHasher.extra_keys`` turns it into per-block extra keys: exactly vLLM's tuples in the
engine modes (``generate_block_hash_extra_keys``: LoRA name and path on every block, each
multimodal item ``("mm", identifier, offset in the block)`` on the blocks its placeholder
tokens overlap, ``cache_salt`` on block 0, ``("prompt_embeds", sha256 of the block's rows)`` on
every block), and the same facts as framed bytes in the xxh3/kvbm modes (LoRA path on block 0,
the salt already seeds every block). The chain carries each key on to every later block.
``RequestKeys.unkeyable_reason`` names what no key can safely express (an item without an
identifier, unordered or overlapping placeholders); such requests must not share blocks.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
import os
import pickle
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cbor2
import numpy as np
import xxhash

from kvtier.errors import ConfigError
from kvtier.tiers import BlockKey

__all__ = [
    "ENGINE_MODES",
    "HASH_MODES",
    "BlockHasher",
    "BlockKey",
    "MmItem",
    "RequestKeys",
    "salt_hash",
    "vllm_extra_keys",
    "vllm_none_hash",
]

FAST_MODES = ("xxh3", "kvbm")
# vLLM's --prefix-caching-hash-algo values, reproduced exactly.
ENGINE_MODES = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
HASH_MODES = FAST_MODES + ENGINE_MODES

_U64 = 0xFFFF_FFFF_FFFF_FFFF
_MAX_TOKEN = 0xFFFF_FFFF
# vLLM derives NONE_HASH from this when PYTHONHASHSEED is unset (cryptographic modes only).
_VLLM_DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
_xxh3_64 = xxhash.xxh3_64_intdigest
_pack_two_u64 = struct.Struct("<QQ").pack
# Framing of the xxh3/kvbm modes' extra key bytes: a tag, then fixed-size fields, then a
# length-prefixed string, so that no two different key lists give the same bytes.
_TAG_MM, _TAG_LORA_PATH, _TAG_EMBEDS = b"\x01", b"\x02", b"\x03"
_pack_mm = struct.Struct("<qI").pack        # item offset relative to the block, id length
_pack_len = struct.Struct("<I").pack
_LITTLE_ENDIAN = sys.byteorder == "little"
_NATIVE_U32_IS_LE = _LITTLE_ENDIAN and array.array("I").itemsize == 4


def salt_hash(cache_salt: str | None = None, lora_name: str | None = None) -> int:
    """The 64-bit salt of a request: xxh3_64 (seed 0) of KVBM's compact JSON payload
    ``{"salt": ..., "lora_name": ...}``, a field left out when it is None (as serde does)."""
    payload: dict[str, str] = {}
    if cache_salt is not None:
        payload["salt"] = cache_salt
    if lora_name is not None:
        payload["lora_name"] = lora_name
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return _xxh3_64(text.encode("utf-8"), 0)


@dataclasses.dataclass(frozen=True, slots=True)
class MmItem:
    """One multimodal input of a request: the identifier of its content (vLLM's
    ``MultiModalFeatureSpec.identifier``, a content hash or a user-given uuid) and the prompt
    positions ``[offset, offset + length)`` its placeholder tokens occupy."""

    identifier: str | None
    offset: int
    length: int


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class RequestKeys:
    """Everything besides its token ids that a request's KV depends on.

    ``mm_items`` are in prompt order; ``prompt_embeds`` is the prompt embeddings as a 2-D
    ``uint8`` array, one row of bytes per prompt position (what vLLM's ``tensor_data`` gives for
    each row). ``unkeyable`` is set by an engine adapter that met an input it could not read.
    """

    cache_salt: str | None = None
    lora_name: str | None = None
    lora_path: str | None = None
    mm_items: tuple[MmItem, ...] = ()
    prompt_embeds: np.ndarray | None = None
    unkeyable: str | None = None

    def unkeyable_reason(self) -> str | None:
        """Why these keys cannot name the request's KV safely (a metric label), or None."""
        if self.unkeyable:
            return self.unkeyable
        end = 0
        for item in self.mm_items:
            if not isinstance(item.identifier, str) or not item.identifier:
                return "mm_no_identifier"
            # vLLM's own keying assumes items sorted by offset and not overlapping.
            if item.offset < end or item.length < 0:
                return "mm_positions"
            end = item.offset + item.length
        embeds = self.prompt_embeds
        if embeds is not None and (not isinstance(embeds, np.ndarray) or embeds.ndim != 2
                                   or embeds.dtype != np.uint8
                                   or not embeds.flags.c_contiguous):
            return "prompt_embeds"
        return None

    @property
    def has_block_keys(self) -> bool:
        """Whether any block needs extra keys in the xxh3/kvbm modes."""
        return bool(self.mm_items or self.prompt_embeds is not None
                    or (self.lora_name and self.lora_path))


def _mm_keys_per_block(items: Sequence[MmItem], first_block_idx: int, num_blocks: int,
                       block_size: int) -> list[list[tuple[str, int]]]:
    """For each block, ``(identifier, item offset - block start)`` of every item whose
    placeholder positions overlap the block, in prompt order (vLLM's
    ``_gen_mm_extra_hash_keys``, for items sorted and not overlapping)."""
    per_block: list[list[tuple[str, int]]] = []
    idx = 0
    num_items = len(items)
    start = first_block_idx * block_size
    # Items wholly before the first block are never needed again.
    while idx < num_items and items[idx].offset + items[idx].length <= start:
        idx += 1
    for _ in range(num_blocks):
        end = start + block_size
        block: list[tuple[str, int]] = []
        i = idx
        while i < num_items and items[i].offset < end:
            item = items[i]
            if item.offset + item.length > start:
                block.append((item.identifier, item.offset - start))
            if item.offset + item.length <= end:
                i += 1
                idx = i   # ends within this block: later blocks start after it
            else:
                break     # spans into the next block
        per_block.append(block)
        start = end
    return per_block


def _embeds_digest(embeds: np.ndarray, start: int, end: int) -> bytes:
    """vLLM's prompt-embeds key: sha256 of the raw bytes of rows ``[start, end)``."""
    return hashlib.sha256(embeds[start:end]).digest()


def vllm_extra_keys(num_blocks: int, *, first_block_idx: int = 0, cache_salt: str | None = None,
                    lora_name: str | None = None, lora_path: str | None = None,
                    mm_items: Sequence[MmItem] = (), prompt_embeds: np.ndarray | None = None,
                    block_size: int = 0) -> list[tuple[Any, ...] | None]:
    """Per-block extra keys exactly as vLLM's ``generate_block_hash_extra_keys`` builds them
    for the engine modes: LoRA on every block, then the multimodal items overlapping the
    block, ``cache_salt`` on the block that starts at token 0 only (the chain carries it on),
    then the block's prompt-embeds digest. ``first_block_idx`` is the index of the first
    block being hashed within the request; ``block_size`` is needed with ``mm_items`` or
    ``prompt_embeds``."""
    if (mm_items or prompt_embeds is not None) and block_size <= 0:
        raise ValueError("vllm_extra_keys: block_size is needed with mm_items or prompt_embeds")
    lora = [("lora", lora_name, lora_path)] if lora_name else []
    mm = (_mm_keys_per_block(mm_items, first_block_idx, num_blocks, block_size)
          if mm_items else None)
    keys: list[tuple[Any, ...] | None] = []
    for n, idx in enumerate(range(first_block_idx, first_block_idx + num_blocks)):
        block_keys = list(lora)
        if mm is not None:
            block_keys.extend(("mm", ident, offset) for ident, offset in mm[n])
        if idx == 0 and cache_salt:
            block_keys.append(("cache_salt", cache_salt))
        if prompt_embeds is not None:
            start = idx * block_size
            block_keys.append(("prompt_embeds",
                               _embeds_digest(prompt_embeds, start, start + block_size)))
        keys.append(tuple(block_keys) if block_keys else None)
    return keys


def _fast_extra_keys(keys: RequestKeys, first_block_idx: int, num_blocks: int,
                     block_size: int) -> list[bytes | None]:
    """The same facts as ``vllm_extra_keys`` as framed bytes for the xxh3/kvbm modes (the
    salt and LoRA name already seed every block; the LoRA path goes on block 0)."""
    mm = (_mm_keys_per_block(keys.mm_items, first_block_idx, num_blocks, block_size)
          if keys.mm_items else None)
    embeds = keys.prompt_embeds
    out: list[bytes | None] = []
    for n, idx in enumerate(range(first_block_idx, first_block_idx + num_blocks)):
        parts: list[bytes] = []
        if idx == 0 and keys.lora_name and keys.lora_path:
            path = keys.lora_path.encode("utf-8")
            parts += (_TAG_LORA_PATH, _pack_len(len(path)), path)
        if mm is not None:
            for ident, offset in mm[n]:
                raw = ident.encode("utf-8")
                parts += (_TAG_MM, _pack_mm(offset, len(raw)), raw)
        if embeds is not None:
            start = idx * block_size
            parts += (_TAG_EMBEDS, _embeds_digest(embeds, start, start + block_size))
        out.append(b"".join(parts) if parts else None)
    return out


def _serialize_pickle(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _serialize_cbor(obj: Any) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


_ENGINE_FUNCS: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], bytes]]] = {
    "sha256": (_serialize_pickle, _sha256),
    "sha256_cbor": (_serialize_cbor, _sha256),
    "xxhash": (_serialize_pickle, xxhash.xxh3_128_digest),
    "xxhash_cbor": (_serialize_cbor, xxhash.xxh3_128_digest),
}


def vllm_none_hash(mode: str = "sha256_cbor", seed: str | None = None) -> bytes:
    """vLLM's NONE_HASH (the first block's parent) for an engine mode.

    vLLM hashes the seed string with the mode's hash function; the seed is PYTHONHASHSEED when
    set, else a fixed string for the sha256 modes. For the xxhash modes vLLM picks a random
    seed per process unless PYTHONHASHSEED is set, which cannot be reproduced: pass the
    engine's ``kv_cache_utils.NONE_HASH`` as ``BlockHasher(none_hash=...)`` instead.
    """
    if mode not in _ENGINE_FUNCS:
        raise ConfigError(f"hash mode {mode!r} has no NONE_HASH: use one of "
                          f"{', '.join(ENGINE_MODES)}")
    if seed is None:
        # vLLM's own rule reads this variable; kvtier must read the same one to agree.
        seed = os.environ.get("PYTHONHASHSEED")
    if seed is None:
        if mode.startswith("xxhash"):
            raise ConfigError(f"hash mode {mode!r}: vLLM seeds NONE_HASH randomly per process "
                              "unless PYTHONHASHSEED is set; set it (same value everywhere) or "
                              "pass the engine's NONE_HASH as none_hash")
        seed = _VLLM_DEFAULT_NONE_HASH_SEED
    serialize, digest = _ENGINE_FUNCS[mode]
    return digest(serialize(seed))


class BlockHasher:
    """Hashes the full blocks of a token sequence into chained keys (see the module doc)."""

    def __init__(self, block_size: int = 16, mode: str = "xxh3", *,
                 none_hash: bytes | None = None) -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ConfigError(f"block_size={block_size!r} is not allowed: use a positive int")
        if mode not in HASH_MODES:
            raise ConfigError(f"hash_mode={mode!r} is not allowed: use one of "
                              f"{', '.join(HASH_MODES)}")
        self.block_size = block_size
        self.mode = mode
        # Splits a buffer of whole blocks into one bytes object per block.
        self._unpack_blocks = struct.Struct(f"{4 * block_size}s").iter_unpack
        self.none_hash: bytes | None = None
        if mode in ENGINE_MODES:
            self.none_hash = none_hash if none_hash is not None else vllm_none_hash(mode)
            self._serialize, self._digest = _ENGINE_FUNCS[mode]
        elif none_hash is not None:
            raise ConfigError(f"none_hash only applies to the engine modes "
                              f"({', '.join(ENGINE_MODES)}), not {mode!r}")

    @property
    def is_engine_mode(self) -> bool:
        """Keys are the engine's own (``bytes``) rather than kvtier's 64-bit ints."""
        return self.mode in ENGINE_MODES

    def salt_of(self, keys: RequestKeys) -> int:
        """The ``salt`` argument of ``hash_blocks`` for a request (0 in the engine modes,
        which take salts as extra keys)."""
        return 0 if self.mode in ENGINE_MODES else salt_hash(keys.cache_salt, keys.lora_name)

    def extra_keys(self, keys: RequestKeys, first_block_idx: int,
                   num_blocks: int) -> list[Any] | None:
        """The ``extra_keys`` argument of ``hash_blocks`` for blocks ``[first_block_idx,
        first_block_idx + num_blocks)`` of a request, or None when no block needs one.
        Callers must refuse keys with an ``unkeyable_reason`` instead of hashing them."""
        if self.mode in ENGINE_MODES:
            if not (keys.lora_name or keys.mm_items or keys.prompt_embeds is not None
                    or keys.cache_salt and first_block_idx == 0):
                return None
            return vllm_extra_keys(num_blocks, first_block_idx=first_block_idx,
                                   cache_salt=keys.cache_salt, lora_name=keys.lora_name,
                                   lora_path=keys.lora_path, mm_items=keys.mm_items,
                                   prompt_embeds=keys.prompt_embeds,
                                   block_size=self.block_size)
        if not keys.has_block_keys:
            return None
        return _fast_extra_keys(keys, first_block_idx, num_blocks, self.block_size)

    def hash_blocks(self, tokens: Sequence[int] | np.ndarray, *, salt: int = 0,
                    parent: BlockKey | None = None,
                    extra_keys: Sequence[Any] | None = None) -> list[BlockKey]:
        """Keys of the full blocks of ``tokens`` (a trailing partial block is ignored).

        ``parent`` continues a chain: the key of the block just before ``tokens[0]``, so that
        hashing a sequence in pieces gives the same keys as hashing it whole. ``salt`` (from
        ``salt_hash``) must be 0 in the engine modes, which take salts as extra keys.
        ``extra_keys[i]`` is mixed into block ``i``: ``bytes`` (or None) in the xxh3/kvbm
        modes, vLLM's per-block tuple (or None) in the engine modes.
        """
        if self.mode in ENGINE_MODES:
            return self._hash_engine(tokens, salt, parent, extra_keys)
        if not isinstance(salt, int) or not 0 <= salt <= _U64:
            raise ValueError(f"salt={salt!r}: expected an int in [0, 2**64)")
        if parent is not None and (not isinstance(parent, int) or not 0 <= parent <= _U64):
            raise ValueError(f"parent={parent!r}: mode {self.mode!r} keys are ints in [0, 2**64)")
        blocks = self._unpack_blocks(self._token_buffer(tokens, self.block_size))
        if extra_keys is not None:
            num_blocks = blocks.__length_hint__()
            if len(extra_keys) < num_blocks:
                raise ValueError(f"extra_keys has {len(extra_keys)} entries for "
                                 f"{num_blocks} blocks")
            if not any(extra_keys):
                extra_keys = None
        if self.mode == "kvbm":
            return self._hash_kvbm(blocks, salt, parent, extra_keys)
        keys: list[BlockKey] = []
        append = keys.append
        h64 = _xxh3_64
        key = 0 if parent is None else parent
        if extra_keys is not None:
            for (block,), extra in zip(blocks, extra_keys):
                key = h64(block + extra if extra else block, key ^ salt)
                append(key)
        elif salt:
            for (block,) in blocks:
                key = h64(block, key ^ salt)
                append(key)
        else:  # XOR with 0 is a no-op: skip it
            for (block,) in blocks:
                key = h64(block, key)
                append(key)
        return keys

    @staticmethod
    def _hash_kvbm(blocks: Iterator[tuple[bytes]], salt: int, parent: int | None,
                   extra_keys: Sequence[Any] | None) -> list[BlockKey]:
        keys: list[BlockKey] = []
        h64 = _xxh3_64
        for idx, (block,) in enumerate(blocks):
            if extra_keys is not None and extra_keys[idx]:
                block += extra_keys[idx]
            block_hash = h64(block, salt)
            parent = block_hash if parent is None else h64(_pack_two_u64(parent, block_hash),
                                                           salt)
            keys.append(parent)
        return keys

    def _hash_engine(self, tokens: Sequence[int] | np.ndarray, salt: int,
                     parent: BlockKey | None, extra_keys: Sequence[Any] | None
                     ) -> list[BlockKey]:
        if salt:
            raise ConfigError(f"hash mode {self.mode!r} takes salts as vLLM extra keys, not an "
                              "int salt: pass salt=0 and extra_keys=vllm_extra_keys(...)")
        if parent is not None and not isinstance(parent, bytes):
            raise ValueError(f"parent={parent!r}: mode {self.mode!r} keys are bytes")
        token_list = tokens.tolist() if isinstance(tokens, np.ndarray) else tokens
        size = self.block_size
        num_blocks = len(token_list) // size
        if extra_keys is not None and len(extra_keys) < num_blocks:
            raise ValueError(f"extra_keys has {len(extra_keys)} entries for {num_blocks} blocks")
        serialize, digest = self._serialize, self._digest
        key = parent or self.none_hash
        keys: list[BlockKey] = []
        for idx in range(num_blocks):
            extra = extra_keys[idx] if extra_keys is not None else None
            block = tuple(token_list[idx * size:(idx + 1) * size])
            key = digest(serialize((key, block, extra)))
            keys.append(key)
        return keys

    @staticmethod
    def _token_buffer(tokens: Sequence[int] | np.ndarray, block_size: int
                      ) -> np.ndarray | memoryview | array.array:
        """The full blocks of ``tokens`` as one contiguous little-endian uint32 buffer (no copy
        for C-contiguous int32/uint32 arrays)."""
        if isinstance(tokens, np.ndarray):
            dtype = tokens.dtype
            if dtype.kind not in "iu":
                raise ValueError(f"token array of dtype {dtype}: expected integers")
            if dtype.itemsize != 4 and tokens.size and (
                    int(tokens.min()) < 0 or int(tokens.max()) > _MAX_TOKEN):
                raise ValueError("token ids must lie in [0, 2**32)")
            if dtype.itemsize == 4 and dtype.byteorder in "=<" and _LITTLE_ENDIAN:
                # int32 ids are reinterpreted as uint32 (ids are never negative).
                words = np.ascontiguousarray(tokens).reshape(-1).view(np.uint32)
            else:
                words = np.ascontiguousarray(tokens, dtype="<u4").reshape(-1)
            extra = len(words) % block_size
            return words[:len(words) - extra] if extra else words
        if not _NATIVE_U32_IS_LE:
            words = np.array(tokens, dtype="<u4")
            return words[:len(words) - len(words) % block_size]
        try:
            # array.array converts a list several times faster than np.array does.
            words = array.array("I", tokens)
        except OverflowError as exc:
            raise ValueError("token ids must lie in [0, 2**32)") from exc
        extra = len(words) % block_size
        return memoryview(words)[:len(words) - extra] if extra else words
