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
"""

from __future__ import annotations

import array
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
from kvtier.storage.block_format import BlockKey

__all__ = [
    "ENGINE_MODES",
    "HASH_MODES",
    "BlockHasher",
    "BlockKey",
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


def vllm_extra_keys(num_blocks: int, *, first_block_idx: int = 0, cache_salt: str | None = None,
                    lora_name: str | None = None, lora_path: str | None = None
                    ) -> list[tuple[Any, ...] | None]:
    """Per-block extra keys as vLLM builds them for the engine modes (LoRA on every block,
    ``cache_salt`` on the block that starts at token 0 only; the chain carries it on).
    ``first_block_idx`` is the index of the first block being hashed within the request."""
    lora = [("lora", lora_name, lora_path)] if lora_name else []
    keys: list[tuple[Any, ...] | None] = []
    for idx in range(first_block_idx, first_block_idx + num_blocks):
        block_keys = lora + ([("cache_salt", cache_salt)] if idx == 0 and cache_salt else [])
        keys.append(tuple(block_keys) if block_keys else None)
    return keys


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
