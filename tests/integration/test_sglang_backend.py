"""kvtier as SGLang's HiCache L3, driven through SGLang's real classes (sglang 0.5.23).

Real here: SGLang's ``StorageBackendFactory`` ("dynamic" path, exactly as
``--hicache-storage-backend dynamic`` builds a backend), its ``HiCacheStorageConfig`` and its
``HiCacheStorage`` base class; kvtier's disk tier (O_DIRECT file, journal) and, where
``redis-server`` exists, a real Redis.

Stand-in: the host pool. SGLang's host pool classes (``sglang.srt.mem_cache.pool_host``) do not
import on this machine: their package imports ``sglang.srt.configs``, which imports torchvision,
and the torchvision wheels available here fail against the CPU torch. ``HostPoolStandIn``
below is the smallest honest stand-in: real CPU tensors of the shapes SGLang's MHA and MLA
host pools allocate for each supported layout, and ``get_page_buffer_meta`` with the same
pointer arithmetic (written from reading sglang's pool_host/mha.py and mla.py), so the
backend's copies go to and from the very addresses SGLang would hand it.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from need import need_module

LAYOUTS = ("layer_first", "page_first", "page_first_direct")
PAGE = 4


class HostPoolStandIn:
    """SGLang's MHATokenToKVPoolHost / MLATokenToKVPoolHost as the L3 backend sees them."""

    def __init__(self, layout: str, *, mla: bool = False, layer_num: int = 3, head_num: int = 2,
                 head_dim: int = 8, num_pages: int = 8, dtype=torch.float16) -> None:
        self.layout, self.page_size, self.layer_num, self.dtype = layout, PAGE, layer_num, dtype
        self.page_num, self.size = num_pages, num_pages * PAGE
        self.mla = mla
        self.head_num, self.head_dim = (1, head_dim) if mla else (head_num, head_dim)
        self.kv_cache_dim = head_dim
        if mla:
            dims = {"layer_first": (layer_num, self.size, 1, head_dim),
                    "page_first": (self.size, layer_num, 1, head_dim),
                    "page_first_direct": (num_pages, layer_num, PAGE, 1, head_dim)}[layout]
        else:
            h, d = head_num, head_dim
            dims = {"layer_first": (2, layer_num, self.size, h, d),
                    "page_first": (2, self.size, layer_num, h, d),
                    "page_first_direct": (2, num_pages, layer_num, PAGE, h, d)}[layout]
        self.kv_buffer = torch.zeros(dims, dtype=dtype)

    def get_size_per_token(self) -> int:
        kv = 1 if self.mla else 2
        return kv * self.head_dim * self.head_num * self.layer_num * self.dtype.itemsize

    def get_page_buffer_meta(self, indices: torch.Tensor):
        assert len(indices) % self.page_size == 0
        base, item = self.kv_buffer.data_ptr(), self.dtype.itemsize
        row = self.head_num * self.head_dim * item  # one token of one layer, K (or V)
        v_offset = self.layer_num * self.size * row
        ptrs: list[int] = []
        starts = indices.tolist()[::self.page_size]
        if self.layout == "layer_first":
            for start in starts:
                for layer in range(self.layer_num):
                    k = base + start * row + layer * self.size * row
                    ptrs += [k] if self.mla else [k, k + v_offset]
            size = self.page_size * row
        else:
            for start in starts:
                k = base + start * self.layer_num * row
                ptrs += [k] if self.mla else [k, k + v_offset]
            size = self.layer_num * self.page_size * row
        return ptrs, [size] * len(ptrs)

    # Legacy (non zero-copy) interface: one flat tensor per page.
    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        kv = self.kv_buffer
        if self.layout == "layer_first":
            page = kv[:, index:index + PAGE] if self.mla else kv[:, :, index:index + PAGE]
        elif self.layout == "page_first":
            page = kv[index:index + PAGE] if self.mla else kv[:, index:index + PAGE]
        else:
            p = index // PAGE
            page = kv[p:p + 1] if self.mla else kv[:, p:p + 1]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(self.page_size * self.get_size_per_token() // self.dtype.itemsize,
                           dtype=self.dtype)

    def page_bytes(self, page: int) -> bytes:
        """Page ``page``'s bytes as the zero-copy interface sees them."""
        ptrs, sizes = self.get_page_buffer_meta(torch.arange(page * PAGE, (page + 1) * PAGE))
        raw = self.kv_buffer.view(torch.uint8).flatten().numpy()
        base = self.kv_buffer.data_ptr()
        return b"".join(raw[p - base:p - base + n].tobytes() for p, n in zip(ptrs, sizes))

    def fill(self, page: int, seed: int) -> bytes:
        """Random bytes into page ``page`` (every piece); returns them."""
        gen = torch.Generator().manual_seed(seed)
        raw = self.kv_buffer.view(torch.uint8).flatten()
        base = self.kv_buffer.data_ptr()
        ptrs, sizes = self.get_page_buffer_meta(torch.arange(page * PAGE, (page + 1) * PAGE))
        for p, n in zip(ptrs, sizes):
            raw[p - base:p - base + n] = torch.randint(0, 256, (n,), generator=gen,
                                                       dtype=torch.uint8)
        return self.page_bytes(page)


def page_hashes(tokens: list[int]) -> list[str]:
    """SGLang's own chained page hashes (what HiCache hands a storage backend as keys)."""
    from sglang.srt.mem_cache.utils import get_hash_str

    keys, prior = [], None
    for start in range(0, len(tokens), PAGE):
        prior = get_hash_str(tokens[start:start + PAGE], prior)
        keys.append(prior)
    return keys


def indices(pages) -> torch.Tensor:
    return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in pages])


@pytest.fixture
def sgl():
    """SGLang's real storage modules (missing sglang fails under REQUIRE_TEST_SERVERS=1)."""
    need_module("sglang.srt.mem_cache.hicache_storage")
    return need_module("sglang.srt.mem_cache.storage.backend_factory")


@pytest.fixture
def make_backend(sgl, tmp_path):
    """``make_backend(pool, tp_rank=, tp_size=, mla=, **kvtier)``: through SGLang's factory."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    made = []

    def make(pool, *, tp_rank=0, tp_size=1, mla=False, interface_v1=1, **settings):
        settings.setdefault("disk_dir", str(tmp_path / "disk"))
        if "remote_url" not in settings:
            settings.setdefault("disk_cache_blocks", 16)
        extra = {"backend_name": "kvtier", "module_path": "kvtier.connectors.sglang",
                 "class_name": "KvtierHiCacheStorage", "interface_v1": interface_v1,
                 **settings}
        config = HiCacheStorageConfig(
            tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
            attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=True,
            is_page_first_layout=pool.layout == "page_first", model_name="org/tiny-model",
            extra_config=extra)
        backend = sgl.StorageBackendFactory.create_backend("dynamic", config, pool)
        backend.register_mem_pool_host(pool)  # as SGLang's cache controller does next
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def stored_pages(pool, keys, pages, seed=0):
    return {k: pool.fill(p, seed + p) for k, p in zip(keys, pages)}


def assert_round_trip(make_backend, layout: str, mla: bool) -> None:
    src = HostPoolStandIn(layout, mla=mla)
    backend = make_backend(src, mla=mla)
    keys = page_hashes(list(range(100, 100 + 4 * PAGE)))
    want = stored_pages(src, keys, range(4))
    assert backend.batch_set_v1(keys, indices(range(4))) == [True] * 4
    assert backend.batch_get_v1(keys, indices(range(4, 8))) == [True] * 4
    for i, key in enumerate(keys):
        assert dst_page(backend, 4 + i) == want[key], f"page {key} came back different"


def dst_page(backend, page: int) -> bytes:
    return backend.mem_pool_host.page_bytes(page)


@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pages_round_trip_through_the_disk_tier(make_backend, layout, mla):
    """Bytes out of the host buffers, onto kvtier's disk file, back into other host pages."""
    assert_round_trip(make_backend, layout, mla)


def test_the_factory_builds_kvtier_and_reads_come_from_disk(make_backend):
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorage

    from kvtier.connectors.sglang import KvtierHiCacheStorage

    pool = HostPoolStandIn("page_first")
    backend = make_backend(pool)
    assert isinstance(backend, KvtierHiCacheStorage) and isinstance(backend, HiCacheStorage)
    want = pool.fill(0, 7)
    assert backend.batch_set_v1(["a"], indices([0])) == [True]
    pool.kv_buffer.zero_()
    assert backend.batch_get_v1(["a"], indices([1])) == [True]
    assert pool.page_bytes(1) == want
    stats = backend.stats()
    assert stats["disk_stores"] == 1 and stats["disk_hits"] == 1
    assert stats["disk"]["blocks_written"] == 1 and stats["disk"]["blocks_read"] == 1
    assert os.path.getsize(backend.disk.data_path) >= 16 * backend.disk.slot_bytes


@pytest.mark.parametrize("copy", ["_copy_to_host", "_copy_to_staging"])
def test_a_missing_copy_fails_the_round_trip(make_backend, monkeypatch, copy):
    """The round-trip check sees the bytes: with either copy made a no-op it fails."""
    import kvtier.connectors.sglang as adapter

    monkeypatch.setattr(adapter, copy, lambda dst, src, nbytes: None)
    with pytest.raises(AssertionError, match="came back different"):
        assert_round_trip(make_backend, "page_first", False)


def test_a_full_disk_tier_evicts_its_least_recent_page(make_backend):
    pool = HostPoolStandIn("page_first")
    backend = make_backend(pool, disk_cache_blocks=2)
    want = stored_pages(pool, ["e0", "e1", "e2"], range(3))
    for page, key in enumerate(["e0", "e1", "e2"]):
        assert backend.batch_set_v1([key], indices([page])) == [True]
    assert backend.batch_exists(["e0"]) == 0 and backend.batch_exists(["e1", "e2"]) == 2
    assert backend.batch_get_v1(["e1", "e2"], indices([4, 5])) == [True, True]
    assert pool.page_bytes(4) == want["e1"] and pool.page_bytes(5) == want["e2"]


def test_batch_exists_counts_consecutive_hits_only(make_backend):
    pool = HostPoolStandIn("layer_first")
    backend = make_backend(pool)
    keys = ["k0", "k1", "k2", "k3", "k4"]
    want = stored_pages(pool, keys, range(5))
    assert backend.batch_set_v1(["k0", "k1"], indices([0, 1])) == [True, True]
    assert backend.batch_set_v1(["k3"], indices([3])) == [True]
    assert backend.batch_exists(keys) == 2
    assert backend.batch_exists(["k2", "k3"]) == 0
    assert backend.batch_exists(["k3"]) == 1
    assert backend.exists("k1") and not backend.exists("k2")
    pool.kv_buffer.zero_()
    assert backend.batch_get_v1(["k0", "k1", "k2"], indices([4, 5, 6])) == [True, True, False]
    assert pool.page_bytes(4) == want["k0"] and pool.page_bytes(5) == want["k1"]
    assert pool.page_bytes(6) == bytes(len(want["k2"]))  # a miss writes nothing


def test_tp_ranks_keep_their_own_pages(make_backend):
    pools = [HostPoolStandIn("page_first"), HostPoolStandIn("page_first")]
    ranks = [make_backend(pools[r], tp_rank=r, tp_size=2) for r in (0, 1)]
    assert ranks[0].block_key("h") != ranks[1].block_key("h")
    want = [pools[r].fill(0, 100 + r) for r in (0, 1)]
    assert want[0] != want[1]
    assert ranks[0].batch_set_v1(["h"], indices([0])) == [True]
    assert ranks[1].batch_exists(["h"]) == 0  # rank 0's shard is not rank 1's
    assert ranks[1].batch_set_v1(["h"], indices([0])) == [True]
    for r in (0, 1):
        assert ranks[r].batch_get_v1(["h"], indices([1])) == [True]
        assert pools[r].page_bytes(1) == want[r]
    assert ranks[0].disk.directory != ranks[1].disk.directory


def test_mla_rank_1_writes_nothing_and_reads_rank_0s_pages(make_backend, tmp_path):
    pools = [HostPoolStandIn("page_first", mla=True), HostPoolStandIn("page_first", mla=True)]
    ranks = [make_backend(pools[r], tp_rank=r, tp_size=2, mla=True) for r in (0, 1)]
    assert ranks[0].block_key("h") == ranks[1].block_key("h")
    assert ranks[1].disk is None and ranks[1].disk_reader is not None
    pools[1].fill(0, 5)
    assert ranks[1].batch_set_v1(["only-rank-1"], indices([0])) == [True]  # skipped, by design
    assert ranks[0].batch_exists(["only-rank-1"]) == 0
    assert ranks[1].batch_exists(["only-rank-1"]) == 0
    want = pools[0].fill(2, 9)
    assert ranks[0].batch_set_v1(["h"], indices([2])) == [True]
    assert ranks[1].batch_exists(["h"]) == 1
    assert ranks[1].batch_get_v1(["h"], indices([3])) == [True]
    assert pools[1].page_bytes(3) == want
    assert sorted(os.listdir(tmp_path / "disk")) == ["sglang-mla-pp0of1-dp0"]
    # Rank 0's bytes changed under rank 1 (a slot rewritten mid-read): a miss on rank 1 too.
    slot = ranks[0].disk_manager.pool.block_of(ranks[0].block_key("h"))
    with open(ranks[0].disk.data_path, "r+b") as f:
        f.seek(slot * ranks[0].disk.slot_bytes + 64 + 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
        os.fsync(f.fileno())
    pools[1].kv_buffer.zero_()
    assert ranks[1].batch_get_v1(["h"], indices([3])) == [False]
    assert pools[1].page_bytes(3) == bytes(len(want))
    assert ranks[1].stats()["disk_reader_failed_reads"] == {"checksum": 1}
    assert ranks[1].batch_exists(["h"]) == 0  # forgotten until rank 0's journal changes


def test_a_corrupt_page_on_disk_is_a_miss_never_wrong_bytes(make_backend):
    pool = HostPoolStandIn("page_first")
    backend = make_backend(pool)
    want = stored_pages(pool, ["good", "bad"], [0, 1])
    assert backend.batch_set_v1(["good", "bad"], indices([0, 1])) == [True, True]
    slot = backend.disk_manager.pool.block_of(backend.block_key("bad"))
    offset = slot * backend.disk.slot_bytes + 64 + 17  # inside the payload
    with open(backend.disk.data_path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
        f.flush()
        os.fsync(f.fileno())
    pool.kv_buffer.zero_()
    assert backend.batch_get_v1(["good", "bad"], indices([2, 3])) == [True, False]
    assert pool.page_bytes(2) == want["good"]
    assert pool.page_bytes(3) == bytes(len(want["bad"]))  # nothing of the bad page arrived
    assert backend.stats()["disk"]["failed_reads"] == {"checksum": 1}
    assert backend.batch_exists(["good", "bad"]) == 1  # the bad page is forgotten


def test_the_store_down_is_a_miss_without_a_hang(make_backend):
    from servers import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    pool = HostPoolStandIn("page_first")
    started = time.monotonic()
    remote_only = make_backend(pool, remote_url=url, remote_timeout_ms=500)
    pool.fill(0, 1)
    assert remote_only.batch_set_v1(["x"], indices([0])) == [False]  # no tier holds it
    assert remote_only.batch_exists(["x"]) == 0
    assert remote_only.batch_get_v1(["x"], indices([1])) == [False]
    assert pool.page_bytes(1) == bytes(len(pool.page_bytes(0)))
    # With a disk tier too, the disk serves what the dead store cannot.
    other = HostPoolStandIn("page_first")
    both = make_backend(other, remote_url=url, remote_timeout_ms=500, disk_cache_blocks=8)
    want = other.fill(0, 2)
    assert both.batch_set_v1(["y"], indices([0])) == [True]
    assert both.batch_get_v1(["y"], indices([1])) == [True]
    assert other.page_bytes(1) == want
    assert time.monotonic() - started < 10.0
    assert remote_only.stats()["remote"]["unavailable"] >= 3


def test_a_restart_finds_what_the_last_process_stored(make_backend):
    pool = HostPoolStandIn("page_first_direct")
    first = make_backend(pool)
    keys = ["r0", "r1", "r2"]
    want = stored_pages(pool, keys, range(3))
    assert first.batch_set_v1(keys, indices(range(3))) == [True] * 3
    first.close()  # releases the disk tier, as a process exit would
    fresh = HostPoolStandIn("page_first_direct")
    second = make_backend(fresh)
    assert second.batch_exists(keys + ["never"]) == 3
    assert second.batch_get_v1(keys, indices(range(3, 6))) == [True] * 3
    for i, key in enumerate(keys):
        assert fresh.page_bytes(3 + i) == want[key]


def test_legacy_methods_round_trip_flat_pages(make_backend):
    pool = HostPoolStandIn("page_first")
    backend = make_backend(pool, interface_v1=0)
    page = pool.get_data_page(0)
    page.copy_(torch.randn(page.shape, generator=torch.Generator().manual_seed(3)))
    assert backend.set("flat", pool.get_data_page(0))
    assert backend.batch_set(["f1"], [pool.get_data_page(0)])
    assert backend.exists("flat") and not backend.exists("nope")
    target = pool.get_dummy_flat_data_page()
    assert backend.get("flat", target) is target
    assert torch.equal(target, pool.get_data_page(0))
    out = backend.batch_get(["f1", "nope"], [pool.get_dummy_flat_data_page(),
                                             pool.get_dummy_flat_data_page()])
    assert out[1] is None and torch.equal(out[0], pool.get_data_page(0))


def test_v2_methods_raise_and_bad_settings_are_refused(make_backend):
    from kvtier.errors import ConfigError, LayoutError

    backend = make_backend(HostPoolStandIn("page_first"))
    for call in (lambda: backend.batch_exists_v2(["k"]), lambda: backend.batch_get_v2([]),
                 lambda: backend.batch_set_v2([])):
        with pytest.raises(NotImplementedError):
            call()
    with pytest.raises(ConfigError, match="disk_cache_gbb"):
        make_backend(HostPoolStandIn("page_first"), disk_cache_gbb=1)
    odd = HostPoolStandIn("page_first")
    odd.layout = "page_head"
    with pytest.raises(LayoutError, match="page_head.*layer_first"):
        make_backend(odd)


def test_a_failed_attach_leaves_the_disk_tier_free(make_backend, tmp_path):
    from kvtier.errors import ConfigError

    settings = {"disk_dir": str(tmp_path / "attach"), "disk_cache_blocks": 4}
    with pytest.raises(ConfigError, match="nosuchstore"):  # fails after the disk tier opened
        make_backend(HostPoolStandIn("page_first"), remote_url="nosuchstore://h:1", **settings)
    pool = HostPoolStandIn("page_first")
    backend = make_backend(pool, **settings)  # the lock was released: this attach works
    want = pool.fill(0, 4)
    assert backend.batch_set_v1(["p"], indices([0])) == [True]
    assert backend.batch_get_v1(["p"], indices([1])) == [True] and pool.page_bytes(1) == want


def test_get_stats_is_sglangs_type_or_none(make_backend):
    backend = make_backend(HostPoolStandIn("page_first"))
    stats = backend.get_stats()
    assert stats is None or hasattr(stats, "prefetch_pgs")


def test_pages_round_trip_through_a_real_redis(make_backend, make_redis):
    server = make_redis()
    pool = HostPoolStandIn("layer_first")
    writer = make_backend(pool, remote_url=server.url)
    keys = ["g0", "g1"]
    want = stored_pages(pool, keys, [0, 1])
    assert writer.batch_set_v1(keys, indices([0, 1])) == [True, True]
    # Another engine instance, no disk: served from the store, verified.
    fresh = HostPoolStandIn("layer_first")
    reader = make_backend(fresh, remote_url=server.url)
    assert reader.batch_exists(keys) == 2
    assert reader.batch_get_v1(keys, indices([2, 3])) == [True, True]
    assert fresh.page_bytes(2) == want["g0"] and fresh.page_bytes(3) == want["g1"]
    # A value changed in the store is a miss, never wrong bytes.
    from kvtier.storage.remote import remote_key

    client = server.raw_client()
    name = remote_key(reader.remote.namespace, reader.block_key("g1"))
    value = bytearray(client.get(name))
    value[100] ^= 1
    client.set(name, bytes(value))
    fresh.kv_buffer.zero_()
    assert reader.batch_get_v1(keys, indices([4, 5])) == [True, False]
    assert fresh.page_bytes(5) == bytes(len(want["g1"]))


def test_backup_and_prefetch_threads_at_once(make_backend):
    """SGLang stores from its backup thread while its prefetch threads load: both at once."""
    import threading

    pool = HostPoolStandIn("layer_first", num_pages=12)
    backend = make_backend(pool, disk_cache_blocks=64)
    old = stored_pages(pool, ["old0", "old1"], [0, 1], seed=50)
    assert backend.batch_set_v1(["old0", "old1"], indices([0, 1])) == [True, True]
    errors: list[str] = []

    def backup():
        for round_ in range(20):
            keys = [f"new{round_}-{i}" for i in range(2)]
            if backend.batch_set_v1(keys, indices([2, 3])) != [True, True]:
                errors.append(f"store {round_}")

    def prefetch(first_page):
        for round_ in range(20):
            dst = [first_page, first_page + 1]
            if backend.batch_get_v1(["old0", "old1"], indices(dst)) != [True, True]:
                errors.append(f"load {round_}")
            elif [pool.page_bytes(p) for p in dst] != [old["old0"], old["old1"]]:
                errors.append(f"bytes {round_}")

    threads = [threading.Thread(target=backup), threading.Thread(target=prefetch, args=(4,)),
               threading.Thread(target=prefetch, args=(6,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert backend.batch_exists([f"new{r}-{i}" for r in range(20) for i in range(2)]) == 40
