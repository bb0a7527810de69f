"""SGLang HiCache L3 storage backend: kvtier's disk (G3) and remote (G4) tiers below HiCache.

Enabled without patching SGLang (mirrors sglang 0.5.23's ``HiCacheStorage`` and its
``StorageBackendFactory`` "dynamic" path)::

    --hicache-storage-backend dynamic --hicache-storage-backend-extra-config
      '{"backend_name": "kvtier", "module_path": "kvtier.connectors.sglang",
        "class_name": "KvtierHiCacheStorage", "interface_v1": 1,
        "disk_cache_gb": 100, "disk_dir": "/nvme/kvtier", "remote_url": "redis://host:6379/0"}'

Every key besides SGLang's own (``SGLANG_KEYS``: ``backend_name``, ``module_path``,
``class_name``, ``interface_v1``, ...) is a kvtier setting (``kvtier.config``); unknown ones are
refused naming the key.

HiCache keeps its own host pool (L2); kvtier is its L3 and holds no second host cache. A page
moves between HiCache's host buffers (``get_page_buffer_meta`` pointers with ``interface_v1``,
one flat tensor per page with the legacy methods) and a small staging arena, whose slots are
the aligned, headed form that ``DiskStorage`` writes with O_DIRECT and the remote backends put
as is. The disk tier's slots belong to kvtier's ``DiskManager`` (slot pool, eviction, admission,
restart recovery); every page read back from disk or the store is verified (key, geometry
fingerprint, checksum) before a byte of it reaches the host pool, so a corrupt or stale page is
a miss.

Keys: blake2b-256 of ``sglang|<model>|<shard>|<page hash>``; the shard names the TP rank and
size (``mla`` for MLA models, whose ranks hold the same KV: only the storage writer, rank 0,
stores, and every rank reads its pages: the disk tier through ``DiskReader``, the store under
one namespace), the PP rank and size, and the attention CP rank where CP is on. The geometry
fingerprint names the model, page shape, dtype, the host layout and the interface (v1 pages
and legacy flat pages order their bytes differently in some layouts).

Not supported, refused at start-up with a clear error: host layouts other than layer_first,
page_first and page_first_direct; decode context parallelism; split heads (``tp_lcm_size``).
The v2 methods (hybrid pools: Mamba, sliding window) raise ``NotImplementedError``, as SGLang
expects of a backend without them.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from kvtier.config import load_config
from kvtier.errors import ConfigError, LayoutError, StorageError
from kvtier.layout import KVGeometry, LayoutKind, dtype_name
from kvtier.managers.disk import DiskManager, disk_admission_policy
from kvtier.metrics import KvtierMetrics
from kvtier.offload.admission import make_admission_policy
from kvtier.storage.block_format import HEADER_BYTES
from kvtier.storage.disk import DiskReader, DiskStorage
from kvtier.storage.host import HostArena, slot_bytes_for
from kvtier.storage.remote import RetryingBackend, make_namespace

logger = logging.getLogger(__name__)

SUPPORTED_LAYOUTS = ("layer_first", "page_first", "page_first_direct")
# Keys of the extra config that are SGLang's, not kvtier settings (SGLang pops some itself).
SGLANG_KEYS = frozenset({"backend_name", "module_path", "class_name", "interface_v1",
                         "tp_lcm_size", "prefetch_threshold", "prefetch_timeout_base",
                         "prefetch_timeout_per_ki_token", "hicache_storage_pass_prefix_keys"})
# Staging: at most this many bytes per direction (loads, stores), at most one batch of pages.
STAGING_BYTES = 32 << 20
MAX_STAGING_PAGES = 128  # SGLang's STORAGE_BATCH_SIZE

Buffers = list[tuple[int, int]]  # one page: (address, bytes) pieces in payload order


def _copy_to_staging(dst: int, src: int, nbytes: int) -> None:
    ctypes.memmove(dst, src, nbytes)


def _copy_to_host(dst: int, src: int, nbytes: int) -> None:
    ctypes.memmove(dst, src, nbytes)


def _block_view(arena: HostArena, slot: int) -> memoryview:
    """Header and payload of staging slot ``slot`` (without the padding): one stored block."""
    return arena.slot_view(slot)[:HEADER_BYTES + arena.payload_bytes]


def page_geometry(pool: Any, *, is_mla: bool, zero_copy: bool) -> KVGeometry:
    """kvtier's geometry of one page of SGLang host pool ``pool``."""
    layout = getattr(pool, "layout", None)
    if layout not in SUPPORTED_LAYOUTS:
        raise LayoutError(f"SGLang host layout {layout!r} is not supported by kvtier: use "
                          f"--hicache-mem-layout {' or '.join(SUPPORTED_LAYOUTS)}")
    layers, page, itemsize = pool.layer_num, pool.page_size, pool.dtype.itemsize
    per_token = pool.get_size_per_token()  # bytes, every layer, K and V
    kv, heads = (1, 1) if is_mla else (2, pool.head_num)
    width = per_token // (layers * itemsize)
    if width * layers * itemsize != per_token or width % (kv * heads):
        kv, heads = 1, 1  # unequal K/V head sizes: one opaque row per token and layer
    return KVGeometry(num_layers=layers, kv_factor=kv, block_size=page, num_kv_heads=heads,
                      head_size=width // (kv * heads), dtype=dtype_name(pool.dtype),
                      layout=LayoutKind.FULLY_CONTIGUOUS,
                      inner_order=f"sglang:{layout}:{'v1' if zero_copy else 'flat'}")


class KvtierHiCacheStorage(HiCacheStorage):
    """HiCache's L3 over kvtier's G3 (local disk) and G4 (remote store); see the module doc."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict | None = None):
        extra = storage_config.extra_config or {}
        self.config = load_config({k: v for k, v in extra.items() if k not in SGLANG_KEYS})
        if not (self.config.has_disk or self.config.has_remote):
            raise ConfigError("kvtier as SGLang's L3 needs a tier: set disk_cache_gb and "
                              "disk_dir, and/or remote_url, in the extra config")
        if getattr(storage_config, "dcp_size", 1) > 1:
            raise ConfigError("kvtier: decode context parallelism (dcp_size > 1) is not "
                              "supported by the SGLang backend")
        if getattr(storage_config, "should_split_heads", False):
            raise ConfigError("kvtier: tp_lcm_size (split heads) is not supported by the "
                              "SGLang backend")
        self.storage_config = storage_config
        self.zero_copy = bool(extra.get("interface_v1", 0))
        self.is_mla = storage_config.is_mla_model
        self.writer = getattr(storage_config, "is_storage_writer",
                              not self.is_mla or storage_config.tp_rank == 0)
        c = storage_config
        self.model_id = self.config.model_id or c.model_name or "model"
        shard = "mla" if self.is_mla else f"tp{c.tp_rank}of{c.tp_size}"
        shard += f"-pp{c.pp_rank}of{c.pp_size}"
        if c.attn_cp_size > 1:
            shard += f"-cp{c.attn_cp_rank}of{c.attn_cp_size}"
        self.shard = shard
        self._shard_index = ((c.pp_rank * c.attn_cp_size + c.attn_cp_rank) * c.tp_size
                             + (0 if self.is_mla else c.tp_rank))
        self._key_prefix = f"sglang|{self.model_id}|{shard}|".encode()
        self._record = bool(c.enable_storage_metrics)
        self.mem_pool_host = None
        self.disk: DiskStorage | None = None
        self.disk_manager: DiskManager | None = None
        self.disk_reader: DiskReader | None = None
        self.remote: RetryingBackend | None = None
        self._load_arena: HostArena | None = None
        self._store_arena: HostArena | None = None
        self._remote_admission = make_admission_policy(self.config.remote_admission)
        self._lock = threading.Lock()  # the DiskManager, counters
        self._load_lock = threading.Lock()  # the load staging arena
        self._store_lock = threading.Lock()  # the store staging arena
        self.counters: Counter = Counter()
        self._window: dict[str, list] = {"prefetch_pgs": [], "backup_pgs": [],
                                         "prefetch_bandwidth": [], "backup_bandwidth": []}

    # -- set-up ---------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Open the tiers for pages of ``mem_pool_host``'s geometry (SGLang calls this once,
        right after building the backend)."""
        if self.mem_pool_host is not None:
            if mem_pool_host is not self.mem_pool_host:
                raise StorageError("kvtier: a second, different host pool was registered")
            return
        geometry = page_geometry(mem_pool_host, is_mla=self.is_mla, zero_copy=self.zero_copy)
        page_bytes = mem_pool_host.get_size_per_token() * mem_pool_host.page_size
        if geometry.block_bytes != page_bytes:
            raise LayoutError(f"kvtier: host pool pages of {page_bytes} B, geometry says "
                              f"{geometry.block_bytes} B")
        self.geometry = geometry
        self.page_bytes = page_bytes
        self.page_size = mem_pool_host.page_size
        self.fingerprint = geometry.fingerprint(self.model_id)
        slot_bytes = slot_bytes_for(geometry)
        num = max(1, min(MAX_STAGING_PAGES, STAGING_BYTES // slot_bytes))
        try:
            self._load_arena = HostArena(num, geometry)
            self._store_arena = HostArena(num, geometry) if self.writer else None
            self._open_tiers(slot_bytes)
        except BaseException:
            self.close()  # nothing stays open (a later attach finds the disk tier free)
            raise
        logger.info("kvtier: SGLang L3 for %s (%s, %s): %d B pages, disk %s, remote %s",
                    self.model_id, self.shard, mem_pool_host.layout, page_bytes,
                    "writer" if self.disk else "reader" if self.disk_reader else "off",
                    self.remote.url if self.remote else "off")
        self.mem_pool_host = mem_pool_host

    def _open_tiers(self, slot_bytes: int) -> None:
        cfg, c = self.config, self.storage_config
        if cfg.has_disk:
            directory = os.path.join(cfg.disk_dir,
                                     f"sglang-{self.shard}-dp{getattr(c, 'dp_rank', 0)}")
            # Tier GB are the engine's: each TP rank holds its share of every page (an MLA
            # page is whole on its one writer). A block count is pages, per rank.
            share = 1 if self.is_mla else c.tp_size
            num_slots = cfg.num_blocks(cfg.disk_cache_gb / share, cfg.disk_cache_blocks,
                                       slot_bytes)
            if num_slots <= 0:
                raise ConfigError(f"disk_cache_gb={cfg.disk_cache_gb} holds no page of "
                                  f"{slot_bytes} B")
            if self.writer:
                self.disk = DiskStorage(directory, num_slots, slot_bytes, self.fingerprint,
                                        o_direct=cfg.disk_o_direct,
                                        io_threads=cfg.disk_io_threads)
                # HiCache offers a page to L3 once (its own write policy filters first), so
                # "auto" admits every page: a frequency filter would refuse it for good.
                admission = disk_admission_policy(cfg.disk_admission, host_caches=False)
                self.disk_manager = DiskManager(
                    num_slots, eviction=cfg.disk_eviction_policy, admission=admission,
                    events=None, block_tokens=self.page_size, world_size=1,
                    metrics=KvtierMetrics())
                self.disk_manager.recover(0, self.disk.recover())
            else:
                self.disk_reader = DiskReader(directory, self.fingerprint, slot_bytes,
                                              o_direct=cfg.disk_o_direct)
        if cfg.has_remote:
            namespace = make_namespace(self.model_id, self.fingerprint, self._shard_index)
            self.remote = RetryingBackend(cfg.remote_url, namespace=namespace,
                                          timeout_s=cfg.remote_timeout_ms / 1000)

    def close(self) -> None:
        """Release the tiers and staging memory (SGLang calls this on detach)."""
        for part in (self.disk, self.disk_reader, self.remote, self._load_arena,
                     self._store_arena):
            if part is not None:
                part.close()
        self.disk = self.disk_reader = self.remote = None
        self._load_arena = self._store_arena = None
        self.disk_manager = None

    # -- keys and buffers -----------------------------------------------------------------

    def block_key(self, key: str) -> bytes:
        """kvtier's key of SGLang page hash ``key`` for this shard."""
        return hashlib.blake2b(self._key_prefix + key.encode(), digest_size=32).digest()

    def _page_buffers(self, num_pages: int, host_indices: Any) -> list[Buffers] | None:
        """Each page's pieces from the host pool, or None if they do not make whole pages."""
        if num_pages == 0:
            return []
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        if len(ptrs) != len(sizes) or len(ptrs) % num_pages:
            logger.error("kvtier: %d page buffers for %d pages", len(ptrs), num_pages)
            return None
        per = len(ptrs) // num_pages
        pages = [list(zip(ptrs[i * per:(i + 1) * per], sizes[i * per:(i + 1) * per]))
                 for i in range(num_pages)]
        if sum(sizes[:per]) != self.page_bytes:
            logger.error("kvtier: host page buffers of %d B, pages are %d B", sum(sizes[:per]),
                         self.page_bytes)
            return None
        return pages

    def _tensor_buffers(self, tensors: Sequence[Any]) -> list[Buffers | None]:
        out: list[Buffers | None] = []
        for t in tensors:
            if t is None or not t.is_contiguous() or t.numel() * t.element_size() != \
                    self.page_bytes:
                out.append(None)
            else:
                out.append([(t.data_ptr(), self.page_bytes)])
        return out

    # -- the data path --------------------------------------------------------------------

    def _on_disk(self, key: bytes) -> bool:
        if self.disk_manager is not None:
            return self.disk_manager.holds(key)
        return self.disk_reader is not None and self.disk_reader.lookup(key) is not None

    def _count_hits(self, keys: list[bytes]) -> int:
        if self.remote is not None:
            self.remote.maybe_reconnect()  # a clock read unless a retry is due
        num = 0
        with self._lock:
            while num < len(keys) and self._on_disk(keys[num]):
                num += 1
        if num < len(keys) and self.remote is not None:
            for found in self.remote.batch_exists(keys[num:]):
                if not found:
                    break
                num += 1
        return num

    def _load(self, keys: list[bytes], dests: Sequence[Buffers | None]) -> list[bool]:
        """Read pages into ``dests``; True only for a verified page whose bytes were copied."""
        ok = [False] * len(keys)
        if self.remote is not None:
            self.remote.maybe_reconnect()
            if not self.remote.drained:  # an abandoned store call may still write the arena
                with self._lock:
                    self.counters["misses"] += len(keys)
                return ok
        started = time.perf_counter()
        arena = self._load_arena
        with self._load_lock:
            for start in range(0, len(keys), arena.num_slots):
                chunk = [i for i in range(start, min(len(keys), start + arena.num_slots))
                         if dests[i] is not None]
                self._load_chunk(arena, start, chunk, keys, ok)
                for i in chunk:
                    if ok[i]:
                        src = arena.base_addr + (i - start) * arena.slot_bytes + HEADER_BYTES
                        for addr, nbytes in dests[i]:
                            _copy_to_host(addr, src, nbytes)
                            src += nbytes
        hits = sum(ok)
        with self._lock:
            self.counters["misses"] += len(keys) - hits
            self._note("prefetch", hits, started)
        return ok

    def _load_chunk(self, arena: HostArena, start: int, chunk: list[int], keys: list[bytes],
                    ok: list[bool]) -> None:
        if self.disk_manager is not None:
            with self._lock:
                pinned = [(i, self.disk_manager.pin(keys[i])) for i in chunk]
            pairs = [(slot, i - start, keys[i]) for i, slot in pinned if slot is not None]
            results = self.disk.read(arena, pairs) if pairs else []
            bad = [pair for pair, good in zip(pairs, results) if not good]
            with self._lock:
                if bad:
                    self.disk_manager.discard([pair[2] for pair in bad])
                self.disk_manager.unpin([pair[0] for pair in pairs])
            if bad:  # failed verification: out of the index, so a restart cannot bring it back
                self.disk.invalidate([pair[0] for pair in bad])
        elif self.disk_reader is not None:
            pairs = [(slot, i - start, keys[i]) for i in chunk
                     if (slot := self.disk_reader.lookup(keys[i])) is not None]
            results = self.disk_reader.read(arena, pairs) if pairs else []
        else:
            pairs, results = [], []
        for (_slot, arena_slot, _key), good in zip(pairs, results):
            ok[start + arena_slot] = good
        with self._lock:
            self.counters["disk_hits"] += sum(results)
        rest = [i for i in chunk if not ok[i]]
        if rest and self.remote is not None:
            results = self.remote.batch_get_into([keys[i] for i in rest],
                                                 [_block_view(arena, i - start) for i in rest])
            for i, good in zip(rest, results):
                ok[i] = good
            with self._lock:
                self.counters["remote_hits"] += sum(results)

    def _store(self, keys: list[bytes], srcs: Sequence[Buffers | None]) -> list[bool]:
        """Write pages from ``srcs``. True: a tier holds the page now, or a policy declined it
        (not an error); False: a write failed and no tier holds it."""
        if not self.writer:  # MLA: rank 0 stores the page every rank holds
            return [True] * len(keys)
        if self.remote is not None:
            self.remote.maybe_reconnect()
        ok = [src is not None for src in srcs]
        started = time.perf_counter()
        arena = self._store_arena
        with self._store_lock:
            for start in range(0, len(keys), arena.num_slots):
                chunk = [i for i in range(start, min(len(keys), start + arena.num_slots))
                         if srcs[i] is not None]
                for i in chunk:
                    dst = arena.base_addr + (i - start) * arena.slot_bytes + HEADER_BYTES
                    for addr, nbytes in srcs[i]:
                        _copy_to_staging(dst, addr, nbytes)
                        dst += nbytes
                self._store_chunk(arena, start, chunk, keys, ok)
        with self._lock:
            self._note("backup", sum(ok), started)
        return ok

    def _store_chunk(self, arena: HostArena, start: int, chunk: list[int], keys: list[bytes],
                     ok: list[bool]) -> None:
        held = dict.fromkeys(chunk, False)
        failed = dict.fromkeys(chunk, False)
        stamped: set[int] = set()
        if self.disk_manager is not None:
            plan = []
            with self._lock:
                for i in chunk:
                    if self.disk_manager.holds(keys[i]):
                        held[i] = True
                    elif self.disk_manager.wants(keys[i]):
                        slot = self.disk_manager.prepare_store(keys[i])
                        if slot is None:
                            failed[i] = True
                        else:
                            plan.append((i, slot))
            results = self.disk.write(arena, [(i - start, slot, keys[i]) for i, slot in plan])
            with self._lock:
                for (i, slot), good in zip(plan, results):
                    self.disk_manager.complete_store(slot, keys[i], good, timed_out=False)
                    held[i] |= good
                    failed[i] |= not good
                    if good:
                        stamped.add(i)  # DiskStorage.write stamped its header
                self.counters["disk_stores"] += sum(results)
        if self.remote is not None:
            wanted = [i for i in chunk if self._remote_admission.admit(keys[i])]
            fresh = [i for i in wanted if i not in stamped]
            arena.write_header([i - start for i in fresh], [keys[i] for i in fresh],
                               self.fingerprint)
            results = self.remote.batch_put([keys[i] for i in wanted],
                                            [_block_view(arena, i - start) for i in wanted])
            for i, good in zip(wanted, results):
                held[i] |= good
                failed[i] |= not good
            with self._lock:
                self.counters["remote_stores"] += sum(results)
        for i in chunk:
            ok[i] = held[i] or not failed[i]

    def _note(self, what: str, pages: int, started: float) -> None:
        """Per-call figures for SGLang's storage metrics (caller holds the lock)."""
        if not self._record or not pages:
            return
        seconds = max(time.perf_counter() - started, 1e-9)
        self._window[f"{what}_pgs"].append(pages)
        self._window[f"{what}_bandwidth"].append(pages * self.page_bytes / seconds / 1e9)

    # -- HiCacheStorage: zero-copy (interface_v1) -----------------------------------------

    def batch_exists(self, keys: list[str],
                     extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many leading pages of ``keys`` a tier holds (consecutive hits only)."""
        return self._count_hits([self.block_key(k) for k in keys])

    def batch_get_v1(self, keys: list[str], host_indices: Any,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        pages = self._page_buffers(len(keys), host_indices)
        if pages is None:
            return [False] * len(keys)
        return self._load([self.block_key(k) for k in keys], pages)

    def batch_set_v1(self, keys: list[str], host_indices: Any,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        if not self.writer:
            return [True] * len(keys)
        pages = self._page_buffers(len(keys), host_indices)
        if pages is None:
            return [False] * len(keys)
        return self._store([self.block_key(k) for k in keys], pages)

    # -- HiCacheStorage: legacy (one flat tensor per page) ---------------------------------

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        return self.batch_get([key], [target_location])[0]

    def batch_get(self, keys: list[str], target_locations: Any = None,
                  target_sizes: Any = None) -> list[Any]:
        targets = list(target_locations or [None] * len(keys))
        ok = self._load([self.block_key(k) for k in keys], self._tensor_buffers(targets))
        return [t if good else None for t, good in zip(targets, ok)]

    def set(self, key: str, value: Any = None, target_location: Any = None,
            target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        if not self.writer:
            return True
        values = list(values or [None] * len(keys))
        return all(self._store([self.block_key(k) for k in keys], self._tensor_buffers(values)))

    def exists(self, key: str) -> bool:
        return self._count_hits([self.block_key(key)]) == 1

    # -- HiCacheStorage: hybrid pools (v2) are not served ---------------------------------

    def batch_exists_v2(self, keys, pool_transfers=None, extra_info=None):
        raise NotImplementedError("kvtier stores whole KV pages only; hybrid pools (v2) are "
                                  "not supported")

    def batch_get_v2(self, transfers, extra_info=None):
        raise NotImplementedError("kvtier stores whole KV pages only; hybrid pools (v2) are "
                                  "not supported")

    def batch_set_v2(self, transfers, extra_info=None):
        raise NotImplementedError("kvtier stores whole KV pages only; hybrid pools (v2) are "
                                  "not supported")

    # -- housekeeping ---------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every page of this rank's disk tier (durably). The remote store is shared
        with other engines and is left as it is."""
        if self.disk_manager is None:
            return
        with self._lock:
            self.disk_manager.pool.clear()
        self.disk.invalidate([slot for slot, _key in self.disk.recover()])

    def stats(self) -> dict[str, Any]:
        """kvtier's counters for this backend (pages), with the tiers' own."""
        with self._lock:
            out: dict[str, Any] = dict(self.counters)
        if self.disk is not None:
            out["disk"] = self.disk.stats.as_dict()
        if self.disk_reader is not None:
            out["disk_reader_failed_reads"] = dict(self.disk_reader.failed_reads)
        if self.remote is not None:
            out["remote"] = self.remote.stats
        return out

    def get_stats(self):
        """SGLang's ``StorageMetrics`` since the last call (with --enable-cache-report's
        storage metrics), or None where SGLang's metrics module does not import."""
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except ImportError:
            return None
        metrics = StorageMetrics()
        with self._lock:
            for name, values in self._window.items():
                getattr(metrics, name).extend(values)
                values.clear()
        return metrics
