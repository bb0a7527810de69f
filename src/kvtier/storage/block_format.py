"""The stored form of one KV block in G2/G3/G4: a fixed 64-byte header, then the payload.

Header (little-endian):
  magic     4s   b"KVTB"
  version   u16  FORMAT_VERSION
  flags     u16  reserved, 0
  geometry  u64  fingerprint of the KV geometry (layers, heads, dtype, layout...)
  key       32s  the block's sequence hash (int hashes as 8 LE bytes, zero padded)
  length    u64  payload bytes
  checksum  u64  xxh3_64 of the payload

A block read from a tier is served only when every field matches what the reader expects; any
mismatch is a miss (``BlockFormatError`` names which field), never data handed to the model.
"""

from __future__ import annotations

import struct

import xxhash

from kvtier.errors import BlockFormatError
from kvtier.tiers import BlockKey

MAGIC = b"KVTB"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHHQ32sQQ")
HEADER_BYTES = HEADER.size  # 64
assert HEADER_BYTES == 64


def key_bytes(key: BlockKey) -> bytes:
    """A block hash as the 32-byte header field."""
    if isinstance(key, int):
        return (key & 0xFFFF_FFFF_FFFF_FFFF).to_bytes(8, "little") + bytes(24)
    if len(key) > 32:
        raise BlockFormatError(f"block key of {len(key)} bytes is longer than 32")
    return key + bytes(32 - len(key))


def checksum(payload) -> int:
    """xxh3_64 of a bytes-like payload (memoryview, numpy array or bytes)."""
    return xxhash.xxh3_64_intdigest(payload)


def pack_header(key: BlockKey, geometry: int, payload) -> bytes:
    """The 64-byte header for ``payload`` stored under ``key``."""
    view = memoryview(payload).cast("B")
    return header_for(key, geometry, view.nbytes, checksum(view))


def header_for(key: BlockKey, geometry: int, length: int, payload_sum: int) -> bytes:
    """The 64-byte header of a ``length``-byte payload whose xxh3_64 is ``payload_sum`` (for
    writers that checksum the payload while they copy it)."""
    return HEADER.pack(MAGIC, FORMAT_VERSION, 0, geometry, key_bytes(key), length, payload_sum)


def expected_checksum(header, key: BlockKey, geometry: int, length: int) -> int:
    """The payload checksum ``header`` promises for block ``key`` of ``length`` bytes; raise
    ``BlockFormatError`` if any other field is not what the reader expects. For readers that
    checksum the payload while they copy it (compare, then use the bytes only on a match)."""
    if len(header) < HEADER_BYTES:
        raise BlockFormatError(f"short header: {len(header)} of {HEADER_BYTES} bytes")
    magic, version, _flags, geo, stored_key, stored_len, stored_sum = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise BlockFormatError(f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise BlockFormatError(f"format version {version}, expected {FORMAT_VERSION}")
    if geo != geometry:
        raise BlockFormatError(f"geometry fingerprint {geo:#x}, expected {geometry:#x}")
    if stored_key != key_bytes(key):
        raise BlockFormatError("block key does not match the requested hash")
    if stored_len != length:
        raise BlockFormatError(f"payload length {length}, header says {stored_len}")
    return stored_sum


def verify(header, payload, key: BlockKey, geometry: int) -> None:
    """Raise ``BlockFormatError`` unless ``header`` + ``payload`` is block ``key`` intact."""
    view = memoryview(payload).cast("B")
    expected = expected_checksum(header, key, geometry, view.nbytes)
    if checksum(view) != expected:
        raise BlockFormatError("checksum mismatch")


def unpack_key(header) -> tuple[bytes, int, int]:
    """(key bytes, geometry, payload length) from a header, validating magic and version."""
    if len(header) < HEADER_BYTES:
        raise BlockFormatError(f"short header: {len(header)} of {HEADER_BYTES} bytes")
    magic, version, _flags, geo, stored_key, length, _sum = HEADER.unpack_from(header)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise BlockFormatError(f"not a kvtier block header (magic {magic!r}, version {version})")
    return stored_key, geo, length
