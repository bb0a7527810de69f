"""The TensorRT-LLM adapter driven through TensorRT-LLM 1.2.x's documented call sequence.

tensorrt_llm cannot be installed here, so a small stand-in runtime (``Runtime`` below) plays
the part of its ``KvCacheConnectorManager`` and executor loop, in their order:
``get_num_new_matched_tokens`` -> ``update_state_after_alloc`` -> ``build_connector_meta`` ->
pickle round trip (the broadcast) -> ``bind_connector_meta`` on every rank -> ``start_load_kv``
-> per layer ``wait_for_layer_load`` / ``save_kv_layer`` -> ``wait_for_save`` ->
``request_finished`` -> ``get_finished`` on every rank, acting only on ids every rank returned.
Each rank's pool is a CPU tensor shaped like TensorRT-LLM's ``[num_blocks, num_layers,
kv_factor, block_elems]``; a fake forward pass writes KV bytes that depend on the prefix, the
position, the layer, K/V and the rank.

The fake request, request data, scheduler output and llm_args objects carry exactly the fields
TensorRT-LLM 1.2.x documents and the adapter reads (``LlmRequest.request_id`` and
``get_tokens(beam)``; ``RequestData``'s five fields; ``SchedulerOutput.new_requests`` /
``cached_requests``; ``llm_args.parallel_config.to_mapping()``,
``llm_args.kv_cache_config.tokens_per_block``, ``llm_args.max_seq_len``) and nothing more.
"""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import time

import pytest
import torch

from kvtier.connectors import trtllm
from kvtier.connectors.trtllm import (
    KvtierConnectorScheduler,
    KvtierConnectorWorker,
    KvtierTrtllmMetadata,
)

NB, L, KV, H, BS, D = 32, 2, 2, 2, 4, 8  # pool geometry of one rank
E = H * BS * D


# -- stand-ins for TensorRT-LLM 1.2.x objects (documented fields only) ---------------------
@dataclasses.dataclass
class FakeRequest:
    request_id: int
    tokens: list[int]

    def get_tokens(self, beam: int) -> list[int]:
        return list(self.tokens)


@dataclasses.dataclass
class RequestData:
    request_id: int
    new_tokens: list[int]
    new_block_ids: list[int]
    computed_position: int
    num_scheduled_tokens: int


@dataclasses.dataclass
class SchedulerOutput:
    new_requests: list[RequestData] = dataclasses.field(default_factory=list)
    cached_requests: list[RequestData] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Mapping:
    rank: int
    world_size: int


@dataclasses.dataclass
class _ParallelConfig:
    rank: int
    world_size: int

    def to_mapping(self) -> _Mapping:
        return _Mapping(self.rank, self.world_size)


@dataclasses.dataclass
class _KvCacheConfig:
    tokens_per_block: int = BS


@dataclasses.dataclass
class FakeLlmArgs:
    parallel_config: _ParallelConfig
    kv_cache_config: _KvCacheConfig = dataclasses.field(default_factory=_KvCacheConfig)
    max_seq_len: int = 256


# -- the stand-in runtime -------------------------------------------------------------------
@dataclasses.dataclass
class _Live:
    request: FakeRequest
    blocks: list[int]
    sent_tokens: int = 0  # tokens already passed in request data
    sent_blocks: int = 0
    computed: int = 0     # tokens whose KV the device holds
    hidden: int = 0       # loaded synchronously: not in the first computed_position


def kv_value(tokens, pos, layer, kv, rank) -> float:
    """The KV a fake model writes: depends on the whole prefix, position, layer, K/V, rank."""
    return float((sum(tokens[:pos + 1]) * 31 + pos * 7 + layer * 3 + kv + rank * 101) % 997)


class Runtime:
    def __init__(self, world_size: int = 1) -> None:
        self.scheduler = KvtierConnectorScheduler(FakeLlmArgs(_ParallelConfig(0, world_size)))
        self.workers = [KvtierConnectorWorker(FakeLlmArgs(_ParallelConfig(r, world_size)))
                        for r in range(world_size)]
        self.pools = [torch.zeros(NB, L, KV, E, dtype=torch.float16) for _ in self.workers]
        for worker, pool in zip(self.workers, self.pools):
            worker.register_kv_caches(pool)
        self.free = list(range(NB))
        self.live: dict[int, _Live] = {}
        self.waiting_load: dict[int, _Live] = {}  # async loads, out of the batch
        self.new_saving: list[int] = []   # not yet passed to get_finished
        self.new_loading: list[int] = []
        self.local_saved: list[set[int]] = [set() for _ in self.workers]
        self.local_loaded: list[set[int]] = [set() for _ in self.workers]
        self.saving: set[int] = set()     # ids whose blocks wait for every rank
        self.held: dict[int, list[int]] = {}
        self.freed: set[int] = set()
        self.metas: list[KvtierTrtllmMetadata] = []

    def allocate(self, num: int) -> list[int]:
        # Hand out the most recently freed blocks last, so a reloaded prefix lands elsewhere.
        blocks, self.free = self.free[:num], self.free[num:]
        return blocks

    def add(self, request: FakeRequest) -> tuple[int, bool]:
        num, is_async = self.scheduler.get_num_new_matched_tokens(request, 0)
        assert not (num == 0 and is_async), "(0, True) is an error for TensorRT-LLM"
        live = _Live(request, self.allocate(-(-len(request.tokens) // BS)))
        self.scheduler.update_state_after_alloc(request, list(live.blocks))
        if is_async:
            self.waiting_load[request.request_id] = live
            self.new_loading.append(request.request_id)
        else:
            self.live[request.request_id] = live
        live.computed = num  # loaded before (sync) or between (async) forward passes
        live.hidden = 0 if is_async else num
        return num, is_async

    def step(self, finished: tuple[int, ...] = (), write: bool = True,
             report: bool = True) -> None:
        """One executor iteration: schedule every live request, run the connector calls."""
        out = SchedulerOutput()
        todo = []
        for rid, live in self.live.items():
            tokens = live.request.tokens
            if live.computed >= len(tokens):
                continue
            data = RequestData(rid, tokens[live.sent_tokens:], live.blocks[live.sent_blocks:],
                               live.computed - live.hidden, len(tokens) - live.computed)
            live.hidden = 0
            (out.new_requests if live.sent_tokens == 0 else out.cached_requests).append(data)
            live.sent_tokens, live.sent_blocks = len(tokens), len(live.blocks)
            todo.append((live, live.computed, len(tokens)))
            live.computed = len(tokens)
        meta = pickle.loads(pickle.dumps(self.scheduler.build_connector_meta(out)))
        self.metas.append(meta)
        for worker in self.workers:
            worker.bind_connector_meta(meta)
            worker.start_load_kv(None)
        for layer in range(L):
            for rank, worker in enumerate(self.workers):
                worker.wait_for_layer_load(layer, None)
                if write:
                    for live, start, stop in todo:
                        self.forward(rank, live, start, stop, layer)
                worker.save_kv_layer(layer, None)
        for worker in self.workers:
            worker.wait_for_save(None)
        for rid in finished:
            self.finish(rid)
        if report:
            self.get_finished()

    def forward(self, rank, live, start, stop, layer) -> None:
        tokens = live.request.tokens
        for pos in range(start, stop):
            block, slot = live.blocks[pos // BS], pos % BS
            for kv in range(KV):
                slab = self.pools[rank][block, layer, kv].view(H, BS, D)
                slab[:, slot, :] = kv_value(tokens, pos, layer, kv, rank)

    def finish(self, rid: int) -> None:
        live = self.live.pop(rid)
        if self.scheduler.request_finished(live.request, list(live.blocks)):
            self.new_saving.append(rid)
            self.saving.add(rid)
            self.held[rid] = live.blocks
        else:
            self.release(rid, live.blocks)

    def release(self, rid: int, blocks: list[int]) -> None:
        self.freed.add(rid)
        self.free.extend(blocks)

    def get_finished(self) -> None:
        saving, loading = self.new_saving, self.new_loading
        self.new_saving, self.new_loading = [], []
        for rank, worker in enumerate(self.workers):
            saved, loaded = worker.get_finished(list(saving), list(loading))
            self.local_saved[rank] |= set(saved)
            self.local_loaded[rank] |= set(loaded)
        done_saving = set.intersection(*self.local_saved)
        done_loading = set.intersection(*self.local_loaded)
        for local in self.local_saved:
            local -= done_saving
        for local in self.local_loaded:
            local -= done_loading
        for rid in done_saving:
            self.saving.discard(rid)
            self.release(rid, self.held.pop(rid))
        for rid in done_loading:
            self.live[rid] = self.waiting_load.pop(rid)

    def idle_until(self, condition, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            self.step()
            time.sleep(0.002)

    def block_bytes(self, rank: int, blocks: list[int]) -> torch.Tensor:
        return self.pools[rank][blocks].clone().view(torch.uint8)


@pytest.fixture
def env(monkeypatch, tmp_path):
    import os

    for name in list(os.environ):
        if name.startswith(("KVTIER_", "DYN_KVBM_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KVTIER_ONBOARD_MODE", "always")

    def setenv(**values):
        for key, value in values.items():
            monkeypatch.setenv(f"KVTIER_{key.upper()}", str(value))
        return tmp_path

    return setenv


def prompt(first: int, num_full: int, tail: int = 3) -> list[int]:
    return [first] + [first * 1000 + i for i in range(1, num_full * BS + tail)]


def offload(rt: Runtime, request: FakeRequest) -> list[int]:
    """Prefill ``request`` and finish it; the blocks' bytes as the device held them."""
    assert rt.add(request) == (0, False)
    blocks = list(rt.live[request.request_id].blocks)
    rt.step(finished=(request.request_id,))
    assert request.request_id in rt.freed  # freed once every rank returned it
    return blocks


# -- bytes round trip -----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_host_tier_restores_a_prefix_byte_for_byte(env, mode):
    env(host_cache_blocks=32, sync_load_max_ms=1e6 if mode == "sync" else 0)
    rt = Runtime()
    a = FakeRequest(1, prompt(7, num_full=3))
    a_blocks = offload(rt, a)
    original = rt.block_bytes(0, a_blocks[:3])
    assert original.any()
    rt.step()  # the step after: the leader commits the stores (every rank reported them)
    rt.pools[0].zero_()  # the device forgets everything

    b = FakeRequest(2, a.tokens[:3 * BS] + [5, 6, 7, 8, 9])  # same 3-block prefix, new tail
    num, is_async = rt.add(b)
    assert (num, is_async) == (3 * BS, mode == "async")
    b_blocks = rt.waiting_load.get(2, rt.live.get(2)).blocks
    assert set(b_blocks[:3]).isdisjoint(a_blocks[:3])  # loads land in B's own blocks
    rt.step(write=False)
    if is_async:
        rt.idle_until(lambda: 2 in rt.live)
    assert torch.equal(rt.block_bytes(0, b_blocks[:3]), original)
    assert not rt.pools[0][b_blocks[3]].any()  # only what was matched is written

    other = FakeRequest(3, prompt(8, num_full=3))
    assert rt.add(other) == (0, False)


def test_an_async_load_is_returned_only_after_its_id_was_given(env):
    env(host_cache_blocks=32, sync_load_max_ms=0)
    rt = Runtime()
    a = FakeRequest(1, prompt(7, num_full=2))
    offload(rt, a)
    rt.step()
    b = FakeRequest(2, a.tokens)
    assert rt.add(b) == (2 * BS, True)
    rt.new_loading.clear()  # the runtime has not passed the id yet
    meta = rt.scheduler.build_connector_meta(SchedulerOutput())
    worker = rt.workers[0]
    worker.bind_connector_meta(meta)
    worker.start_load_kv(None)
    worker.wait_for_save(None)
    worker.worker.drain()
    assert worker.get_finished([], []) == ([], [])
    assert worker.get_finished([], [2]) == ([], [2])
    assert worker.get_finished([], []) == ([], [])  # each id once


def test_disk_tier_restores_a_prefix_byte_for_byte(env):
    tmp = env(disk_cache_blocks=64, disk_admission="always", disk_o_direct="false",
              sync_load_max_ms=0)
    env(disk_dir=tmp / "disk")
    rt = Runtime()
    a = FakeRequest(1, prompt(11, num_full=4))
    a_blocks = offload(rt, a)
    original = rt.block_bytes(0, a_blocks[:4])
    leader = rt.scheduler.leader
    assert leader.host is not None and not rt.scheduler.config.has_host  # G2 stages only
    rt.idle_until(lambda: leader.g3.num_inactive >= 4)  # written to disk, committed
    rt.pools[0].zero_()

    b = FakeRequest(2, a.tokens[:4 * BS] + [1, 2])
    num, is_async = rt.add(b)
    assert num == 4 * BS and is_async
    rt.step(write=False)
    rt.idle_until(lambda: 2 in rt.live)
    assert torch.equal(rt.block_bytes(0, rt.live[2].blocks[:4]), original)


# -- two ranks ------------------------------------------------------------------------------
def two_rank_disk_runtime(env) -> Runtime:
    """Two ranks over a disk-only tier whose loads are all asynchronous."""
    tmp = env(disk_cache_blocks=64, disk_admission="always", disk_o_direct="false",
              sync_load_max_ms=0)
    env(disk_dir=tmp / "disk")
    return Runtime(world_size=2)


def test_two_ranks_an_id_is_finished_only_once_both_reported(env):
    rt = two_rank_disk_runtime(env)
    a = FakeRequest(1, prompt(13, num_full=3))
    a_blocks = offload(rt, a)
    originals = [rt.block_bytes(r, a_blocks[:3]) for r in range(2)]
    assert not torch.equal(originals[0], originals[1])  # each rank holds its own shard
    leader = rt.scheduler.leader
    rt.idle_until(lambda: leader.g3.num_inactive >= 3)
    for pool in rt.pools:
        pool.zero_()

    # Rank 1 is slow: its background disk reads land, but it does not collect them yet.
    slow = rt.workers[1].worker
    real_poll = slow.poll
    slow.poll = lambda: None
    b = FakeRequest(2, a.tokens[:3 * BS] + [4])
    assert rt.add(b) == (3 * BS, True)
    rt.step(write=False)
    rt.idle_until(lambda: 2 in rt.local_loaded[0])
    rt.step()
    assert 2 not in rt.local_loaded[1]
    assert 2 not in rt.live  # rank 0 alone is not enough
    slow.poll = real_poll
    rt.idle_until(lambda: 2 in rt.live)
    for rank in range(2):
        assert torch.equal(rt.block_bytes(rank, rt.live[2].blocks[:3]), originals[rank])


def test_reports_of_every_rank_reach_the_leader(env):
    env(host_cache_blocks=32, sync_load_max_ms=1e6)
    rt = Runtime(world_size=2)
    a = FakeRequest(1, prompt(17, num_full=2))
    rt.add(a)
    rt.step(report=False)  # both ranks stored the blocks; neither has reported yet

    def matched(request_id: int) -> int:
        probe = FakeRequest(request_id, a.tokens + [1])
        num, _ = rt.scheduler.get_num_new_matched_tokens(probe, 0)
        rt.scheduler.request_finished(probe, [])
        return num

    rt.workers[0].get_finished([], [])  # rank 0's report reaches the leader; rank 1's not
    rt.scheduler.build_connector_meta(SchedulerOutput())
    assert matched(10) == 0  # a block is matchable only once every rank has it
    rt.workers[1].get_finished([], [])
    rt.scheduler.build_connector_meta(SchedulerOutput())
    assert matched(11) == 2 * BS


# -- freeing waits for saves ----------------------------------------------------------------
def test_request_finished_defers_freeing_until_every_rank_saved(env):
    env(host_cache_blocks=32)
    rt = Runtime(world_size=2)
    a = FakeRequest(1, prompt(19, num_full=2))
    rt.add(a)
    blocks = list(rt.live[1].blocks)
    # The step stores A's two full blocks; A ends in it, before the ranks' reports arrive.
    rt.step(report=False)
    assert len(rt.metas[-1].plan.stores) == 2
    assert rt.metas[-1].saves == {"1": list(rt.metas[-1].plan.stores.op_ids)}
    rt.finish(1)
    assert 1 in rt.saving and not set(blocks) & set(rt.free)  # freeing waits
    saved = [w.get_finished([1], [])[0] for w in rt.workers]
    assert saved == [[1], [1]]  # each rank returns it once its own stores are done

    # A rank that was given a plan but whose wait_for_save the runtime skipped runs it in
    # get_finished before answering, so its requests never wait forever.
    c = FakeRequest(3, prompt(29, num_full=2))
    rt.add(c)
    out = SchedulerOutput([RequestData(3, list(c.tokens), list(rt.live[3].blocks), 0,
                                       len(c.tokens))])
    meta = pickle.loads(pickle.dumps(rt.scheduler.build_connector_meta(out)))
    assert len(meta.plan.stores) == 2
    for rank, worker in enumerate(rt.workers):
        worker.bind_connector_meta(meta)
        worker.start_load_kv(None)
    assert rt.scheduler.request_finished(c, list(rt.live[3].blocks)) is True
    assert [w.get_finished([3], []) for w in rt.workers] == [([3], []), ([3], [])]


def test_request_finished_defers_freeing_while_a_load_writes_its_blocks(env):
    rt = two_rank_disk_runtime(env)
    a = FakeRequest(1, prompt(31, num_full=3))
    offload(rt, a)
    leader = rt.scheduler.leader
    rt.idle_until(lambda: leader.g3.num_inactive >= 3)
    slow = rt.workers[1].worker
    real_poll = slow.poll
    slow.poll = lambda: None  # rank 1's disk read is still in flight
    b = FakeRequest(2, a.tokens[:3 * BS] + [4])
    assert rt.add(b) == (3 * BS, True)
    blocks = list(rt.waiting_load[2].blocks)
    rt.idle_until(lambda: 2 in rt.local_loaded[0])
    assert 2 not in rt.local_loaded[1]
    # B is cancelled while rank 1 still loads into its blocks.
    live = rt.waiting_load.pop(2)
    rt.local_loaded[0].discard(2)
    rt.live[2] = live
    rt.finish(2)
    assert 2 in rt.saving
    rt.step()
    assert 2 in rt.local_saved[0] and 2 not in rt.local_saved[1]
    assert not set(blocks) & set(rt.free)
    slow.poll = real_poll
    rt.idle_until(lambda: 2 in rt.freed)
    assert set(blocks) <= set(rt.free)


def test_a_saved_request_whose_reports_arrived_is_freed_at_once(env):
    env(host_cache_blocks=32)
    rt = Runtime()
    a = FakeRequest(1, prompt(23, num_full=2))
    rt.add(a)
    rt.step()
    rt.step()  # the reports of the stores were taken
    assert rt.scheduler.request_finished(a, list(rt.live[1].blocks)) is False


# -- the module's shape ---------------------------------------------------------------------
def test_runs_without_tensorrt_llm_on_stand_in_bases():
    if trtllm.HAVE_TRTLLM:
        pytest.skip("tensorrt_llm is installed: the real bases are used")
    worker_methods = ("register_kv_caches", "start_load_kv", "wait_for_layer_load",
                      "save_kv_layer", "wait_for_save", "get_finished", "bind_connector_meta",
                      "get_connector_meta", "register_forward_pass_callable")
    scheduler_methods = ("build_connector_meta", "get_num_new_matched_tokens",
                         "update_state_after_alloc", "request_finished")
    assert all(callable(getattr(KvtierConnectorWorker, m)) for m in worker_methods)
    assert all(callable(getattr(KvtierConnectorScheduler, m)) for m in scheduler_methods)


# Parameters of every method of the 1.2.x abstract classes, as their source declares them.
DOCUMENTED = {
    KvtierConnectorScheduler: {
        "build_connector_meta": ["self", "scheduler_output"],
        "get_num_new_matched_tokens": ["self", "request", "num_computed_tokens"],
        "request_finished": ["self", "request", "cache_block_ids"],
        "update_state_after_alloc": ["self", "request", "block_ids"],
    },
    KvtierConnectorWorker: {
        "register_kv_caches": ["self", "kv_cache_tensor"],
        "start_load_kv": ["self", "stream"],
        "wait_for_layer_load": ["self", "layer_idx", "stream"],
        "save_kv_layer": ["self", "layer_idx", "stream"],
        "wait_for_save": ["self", "stream"],
        "get_finished": ["self", "finished_gen_req_ids", "started_loading_req_ids"],
        "bind_connector_meta": ["self", "metadata"],
        "get_connector_meta": ["self"],
        "register_forward_pass_callable": ["self"],
    },
}


@pytest.mark.parametrize("cls", list(DOCUMENTED))
def test_methods_have_the_documented_signatures(cls):
    for name, params in DOCUMENTED[cls].items():
        assert list(inspect.signature(getattr(cls, name)).parameters) == params, name


def test_scheduler_idles_until_rank_0_registered_its_pool(env):
    env(host_cache_blocks=8)
    scheduler = KvtierConnectorScheduler(FakeLlmArgs(_ParallelConfig(0, 1)))
    request = FakeRequest(1, prompt(3, 2))
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    out = SchedulerOutput([RequestData(1, list(request.tokens), [0, 1, 2], 0, 11)])
    assert scheduler.build_connector_meta(out).plan.is_empty()
    worker = KvtierConnectorWorker(FakeLlmArgs(_ParallelConfig(0, 1)))
    worker.register_kv_caches(torch.zeros(NB, L, KV, E, dtype=torch.float16))
    later = FakeRequest(2, prompt(4, 2))
    assert scheduler.get_num_new_matched_tokens(later, 0) == (0, False)
    out = SchedulerOutput([RequestData(2, list(later.tokens), [3, 4, 5], 0, 11)],
                          [RequestData(1, [5], [], 11, 1)])
    meta = scheduler.build_connector_meta(out)
    assert list(meta.plan.stores.src) == [3, 4]  # now it stores (requests it has matched)


def test_miss_is_zero_and_synchronous(env):
    env(host_cache_blocks=8)
    rt = Runtime()
    assert rt.scheduler.get_num_new_matched_tokens(FakeRequest(9, prompt(3, 2)), 0) == (0, False)


def test_signatures_match_the_real_abstract_classes():
    kvc = pytest.importorskip("tensorrt_llm._torch.pyexecutor.kv_cache_connector")
    pairs = ((KvtierConnectorScheduler, kvc.KvCacheConnectorScheduler),
             (KvtierConnectorWorker, kvc.KvCacheConnectorWorker))
    for ours, theirs in pairs:
        assert issubclass(ours, theirs)
        assert not ours.__abstractmethods__
        for name, member in inspect.getmembers(theirs, inspect.isfunction):
            if name.startswith("__"):
                continue
            mine = inspect.signature(getattr(ours, name)).parameters
            real = inspect.signature(member).parameters
            assert list(mine) == list(real), f"{ours.__name__}.{name}"
    for cls, methods in DOCUMENTED.items():  # the list above is the real API's
        real = kvc.KvCacheConnectorScheduler if cls is KvtierConnectorScheduler \
            else kvc.KvCacheConnectorWorker
        for name, params in methods.items():
            assert list(inspect.signature(getattr(real, name)).parameters) == params, name
    assert list(inspect.signature(KvtierConnectorScheduler).parameters) == ["llm_args"]
    assert list(inspect.signature(KvtierConnectorWorker).parameters) == ["llm_args"]
