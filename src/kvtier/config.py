"""kvtier configuration: one frozen dataclass, loaded from layered sources.

Layers, lowest to highest precedence:
  1. defaults below;
  2. a YAML or TOML file named by ``KVTIER_CONFIG`` (or passed as ``config_file``);
  3. KVBM's ``DYN_KVBM_*`` aliases (logged as deprecated);
  4. ``KVTIER_<KEY>`` environment variables;
  5. the engine's extra-config dict (vLLM ``kv_connector_extra_config``).

This is the only module that reads the environment or config files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvtier.errors import ConfigError
from kvtier.tiers import Tier

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, as a package (a dependency on Python 3.10 only)
    import tomli as tomllib

logger = logging.getLogger(__name__)

ONBOARD_MODES = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class KvtierConfig:
    # Tier sizes: GB (10**9 bytes) or an explicit block count (the count wins when both are set).
    host_cache_gb: float = 0.0
    host_cache_blocks: int = 0
    disk_cache_gb: float = 0.0
    disk_cache_blocks: int = 0
    disk_dir: str = ""
    disk_o_direct: bool = True
    disk_io_threads: int = 4
    remote_url: str = ""
    remote_timeout_ms: int = 2000
    remote_admission: str = "always"

    # Policies.
    host_eviction_policy: str = "dueling"
    disk_eviction_policy: str = "dueling"
    disk_admission: str = "auto"
    offload_min_priority: int = 0
    onboard_mode: str = "auto"
    # Loads estimated to take at most this long run inside the step that needs them (no
    # extra engine step of waiting); longer ones run between steps.
    sync_load_max_ms: float = 20.0

    # Hashing.
    hash_mode: str = "xxh3"

    # Transfers.
    max_transfer_batch_blocks: int = 64
    max_concurrent_transfers: int = 4
    # Verify every G2 (host RAM) block against its header checksum before it is copied to the
    # device, as G3/G4 blocks always are (headers are stamped when blocks reach G2).
    verify_host: bool = True

    # Observability.
    metrics_port: int = 0
    events_endpoint: str = ""
    model_id: str = ""

    def __post_init__(self) -> None:
        _check_non_negative(self, ("host_cache_gb", "host_cache_blocks", "disk_cache_gb",
                                   "disk_cache_blocks", "offload_min_priority",
                                   "sync_load_max_ms"))
        _check_positive(self, ("disk_io_threads", "remote_timeout_ms",
                               "max_transfer_batch_blocks", "max_concurrent_transfers"))
        from kvtier.hashing import HASH_MODES

        _check_choice(self, "hash_mode", HASH_MODES)
        _check_choice(self, "onboard_mode", ONBOARD_MODES)
        # Policy names come from their registries, so a new policy needs no edit here.
        from kvtier.offload.admission import admission_policy_names
        from kvtier.pools import eviction_policy_names

        _check_choice(self, "disk_admission", ("auto", *admission_policy_names()))
        _check_choice(self, "remote_admission", tuple(admission_policy_names()))
        for key in ("host_eviction_policy", "disk_eviction_policy"):
            value = getattr(self, key)
            # A dotted path names a user policy class ("pkg.module.ClassName").
            if value not in eviction_policy_names() and "." not in value:
                raise ConfigError(f"{key}={value!r} is not allowed: use one of "
                                  f"{', '.join(eviction_policy_names())} or a 'module.Class' "
                                  "path")
        if self.offload_min_priority > 100:
            raise ConfigError(f"offload_min_priority={self.offload_min_priority} is not allowed: "
                              "use 0..100")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port={self.metrics_port} is not allowed: use 0 (off) "
                              "or 1..65535")
        if self.has_disk and not self.disk_dir:
            raise ConfigError("disk_dir is required when disk_cache_gb or disk_cache_blocks is set")
        # The scheme names a remote backend (storage/remote registry), checked when it opens.
        if self.remote_url and "://" not in self.remote_url:
            raise ConfigError(f"remote_url={redact_url(self.remote_url)!r} is not allowed: use "
                              "mooncake://HOST:PORT?metadata=... or redis://HOST:PORT/DB")

    @property
    def has_host(self) -> bool:
        return self.host_cache_gb > 0 or self.host_cache_blocks > 0

    @property
    def has_disk(self) -> bool:
        return self.disk_cache_gb > 0 or self.disk_cache_blocks > 0

    @property
    def has_remote(self) -> bool:
        return bool(self.remote_url)

    def num_blocks(self, tier_gb: float, tier_blocks: int, block_bytes: int) -> int:
        """A tier's capacity in blocks: the explicit count, else GB / bytes per block."""
        if tier_blocks:
            return tier_blocks
        return int(tier_gb * 1e9) // block_bytes

    def describe(self) -> dict[str, Any]:
        """Non-default settings, safe to log (credentials redacted)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value != field.default:
                out[field.name] = redact_url(value) if field.name == "remote_url" else value
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(KvtierConfig)}
# Largest accepted float setting (1 PB as a tier size in GB; far beyond any timeout in ms).
_MAX_FLOAT_SETTING = 1e6

# KVBM's environment variables, accepted so its users can switch without edits.
KVBM_ALIASES = {
    "DYN_KVBM_CPU_CACHE_GB": "host_cache_gb",
    "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "host_cache_blocks",
    "DYN_KVBM_DISK_CACHE_GB": "disk_cache_gb",
    "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "disk_cache_blocks",
    "DYN_KVBM_DISK_CACHE_DIR": "disk_dir",
    "DYN_KVBM_HOST_OFFLOAD_PREFIX_MIN_PRIORITY": "offload_min_priority",
    "DYN_KVBM_MAX_TRANSFER_BATCH_SIZE": "max_transfer_batch_blocks",
    "DYN_KVBM_MAX_CONCURRENT_TRANSFERS": "max_concurrent_transfers",
    "DYN_KVBM_METRICS_PORT": "metrics_port",
}

# Keys an engine passes in its extra-config that belong to the engine or other connectors.
_IGNORED_EXTRA_KEYS = frozenset({"kv_connector", "kv_role"})


def default_eviction_policy(tier: Tier) -> str:
    """What a tier evicts by unless told: the host and disk tiers' defaults above; LRU for G1
    (vLLM's prefix cache) and G4 (the remote store keeps its own order)."""
    return {Tier.G2: KvtierConfig.host_eviction_policy,
            Tier.G3: KvtierConfig.disk_eviction_policy}.get(tier, "lru")


def load_config(extra: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None,
                config_file: str | os.PathLike[str] | None = None) -> KvtierConfig:
    """Build a config from defaults, file, KVBM aliases, KVTIER_* env and ``extra``."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}

    path = config_file or env.get("KVTIER_CONFIG")
    if path:
        values.update(_parse_all(_read_file(Path(path)), source=f"config file {path}"))

    for alias, key in KVBM_ALIASES.items():
        if alias in env:
            logger.warning("%s is deprecated; use KVTIER_%s (or %s in the extra config)",
                           alias, key.upper(), key)
            values[key] = _parse(key, env[alias], source=f"env {alias}")

    for name, raw in env.items():
        if not name.startswith("KVTIER_") or name == "KVTIER_CONFIG":
            continue
        key = name[len("KVTIER_"):].lower()
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting env {name}: allowed keys are "
                              f"{', '.join(sorted(_FIELDS))}")
        values[key] = _parse(key, raw, source=f"env {name}")

    if extra:
        extra = {k: v for k, v in extra.items() if k not in _IGNORED_EXTRA_KEYS}
        values.update(_parse_all(extra, source="extra config"))

    try:
        return KvtierConfig(**values)
    except TypeError as exc:  # pragma: no cover - _parse_all already rejects unknown keys
        raise ConfigError(str(exc)) from exc


def _read_file(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except (UnicodeDecodeError, ValueError) as exc:  # not text, or a NUL in the path
        raise ConfigError(f"cannot read config file {path!r}: {exc}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {path}: use a .toml, .yaml or .yml file")
    except ConfigError:
        raise
    except Exception as exc:  # parser errors differ per format; report them uniformly
        raise ConfigError(f"config file {path} is not valid: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a table of settings")
    # Allow the settings at top level or under a [kvtier] table.
    data = data.get("kvtier", data)
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path}: [kvtier] must be a table of settings")
    return data


def _parse_all(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    out = {}
    for key, value in raw.items():
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r} in {source}: allowed keys are "
                              f"{', '.join(sorted(_FIELDS))}")
        out[key] = _parse(key, value, source)
    return out


def _parse(key: str, value: Any, source: str) -> Any:
    """Coerce one value to its field's type, or raise naming the key."""
    kind = type(_FIELDS[key].default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            # inf/nan, or sizes whose bytes overflow, are typos, not tier sizes.
            if not math.isfinite(number) or abs(number) > _MAX_FLOAT_SETTING:
                raise ValueError
            return number
        if not isinstance(value, (str, os.PathLike)):
            raise TypeError
        return str(value)
    except (TypeError, ValueError):
        shown = redact_url(str(value)) if key == "remote_url" else repr(value)
        raise ConfigError(f"{key}={shown} from {source} is not a valid {kind.__name__}") from None


def redact_url(url: str) -> str:
    """Drop credentials from a URL so it can be logged or used as a label: the user-info
    part (up to the LAST '@' of the authority, as URL parsers split it) and any password or
    token query parameter."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, slash, tail = rest.partition("/")
    if "?" in authority and not slash:
        authority, qmark, query = authority.partition("?")
        tail = qmark + query
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    tail = _SECRET_PARAM.sub(r"\1***", tail)
    # A URL inside a parameter (S3's endpoint=http://user:secret@host) has user-info too.
    tail = _NESTED_USERINFO.sub(r"\1***@", tail)
    return f"{scheme}{sep}{authority}{slash}{tail}"


_NESTED_USERINFO = re.compile(r"(://)[^/?&;#@]*@")
_SECRET_PARAM = re.compile(r"((?:^|[?&;])(?:password|passwd|pwd|token|secret|"
                           r"access_key|secret_key)=)[^&;#]*", re.IGNORECASE)


def _check_non_negative(cfg: KvtierConfig, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} is not allowed: must be >= 0")


def _check_positive(cfg: KvtierConfig, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}={getattr(cfg, key)} is not allowed: must be > 0")


def _check_choice(cfg: KvtierConfig, key: str, allowed: tuple[str, ...]) -> None:
    if getattr(cfg, key) not in allowed:
        raise ConfigError(f"{key}={getattr(cfg, key)!r} is not allowed: use one of "
                          f"{', '.join(allowed)}")
