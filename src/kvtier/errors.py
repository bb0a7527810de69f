"""kvtier's exception tree: one root, one subclass per area.

Expected outcomes (a miss, a full pool, back-pressure) are return values, never exceptions.
Exceptions mean a broken contract or bad input, and name what was wrong.
"""


class KvtierError(Exception):
    """Root of every error kvtier raises on purpose."""


class ConfigError(KvtierError):
    """A config key is unknown or its value is not allowed."""


class BlockStateError(KvtierError):
    """A block lifecycle contract was broken (double release, unknown id, bad transition)."""


class LayoutError(KvtierError):
    """Registered KV tensors have a shape, dtype or layout kvtier cannot handle."""


class StorageError(KvtierError):
    """A tier's storage could not be set up or used (directory, file, server)."""


class TransferError(KvtierError):
    """A transfer request was malformed (unknown tiers, mismatched block lists)."""


class BlockFormatError(KvtierError):
    """Stored block bytes failed validation (bad magic, version, geometry, hash or checksum)."""


class MetadataError(KvtierError):
    """Connector metadata from a peer could not be decoded."""


class TraceError(KvtierError):
    """A replay trace is malformed; the message names the line."""
