"""Capacity planning units: a model's KV geometry gives bytes per block, sizes become blocks.

A replay counts blocks; operators buy gigabytes. :func:`model_geometry` builds the
:class:`~kvtier.layout.KVGeometry` of a model (layers, KV heads, head size, dtype, tokens per
block) and :func:`parse_capacity` turns ``"24000"`` (blocks) or ``"64GB"`` into blocks.
"""

from __future__ import annotations

import re

from kvtier.errors import ConfigError
from kvtier.layout import KVGeometry, LayoutKind

# Short names people type, and the torch dtype names KVGeometry takes (no torch import).
_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "half": "float16", "fp32": "float32", "float32": "float32", "fp8": "float8_e4m3fn",
           "fp8_e4m3": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn",
           "fp8_e5m2": "float8_e5m2", "float8_e5m2": "float8_e5m2", "int8": "int8"}

_UNITS = {"": None, "blocks": None, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def model_geometry(*, num_layers: int = 32, num_kv_heads: int = 8, head_size: int = 128,
                   dtype: str = "bfloat16", block_tokens: int = 512,
                   kv_factor: int = 2) -> KVGeometry:
    """KV geometry of a model; the defaults are Llama-3.1-8B in bf16 (128 KiB per token)."""
    torch_dtype = _DTYPES.get(str(dtype).lower())
    if torch_dtype is None:
        raise ConfigError(f"dtype={dtype!r} is not allowed: use one of "
                          f"{', '.join(sorted(_DTYPES))}")
    for name, value in (("layers", num_layers), ("kv heads", num_kv_heads),
                        ("head size", head_size), ("block tokens", block_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} is not allowed: must be an integer >= 1")
    if kv_factor not in (1, 2):
        raise ConfigError(f"kv_factor={kv_factor!r} is not allowed: 2 (K and V) or 1 (MLA)")
    return KVGeometry(num_layers=num_layers, kv_factor=kv_factor, block_size=block_tokens,
                      num_kv_heads=num_kv_heads, head_size=head_size, dtype=torch_dtype,
                      layout=LayoutKind.CROSS_LAYER)


def bytes_per_token(geometry: KVGeometry) -> int:
    return geometry.block_bytes // geometry.block_size


def parse_capacity(text: str, block_bytes: int, *, name: str = "capacity") -> int:
    """A tier size in blocks from ``"24000"`` (blocks) or ``"16GB"``/``"1.5TiB"`` (bytes)."""
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(f"{name}={text!r} is not a size: use a block count (24000) or bytes "
                          "with a unit (16GB, 512GiB, 1.5TB)")
    value = float(match.group(1))
    scale = _UNITS[unit]
    if scale is None:
        if not value.is_integer():
            raise ConfigError(f"{name}={text!r}: a block count must be a whole number")
        blocks = int(value)
    else:
        blocks = int(value * scale // block_bytes)
    if blocks < 1:
        raise ConfigError(f"{name}={text!r} is less than one block ({block_bytes} bytes)")
    return blocks


def parse_capacity_list(text: str, block_bytes: int, *, name: str = "capacities") -> list[int]:
    """Comma-separated sizes, in blocks, in the order given."""
    items = [item for item in str(text).split(",") if item.strip()]
    if not items:
        raise ConfigError(f"{name}={text!r}: give at least one size")
    return [parse_capacity(item, block_bytes, name=name) for item in items]
