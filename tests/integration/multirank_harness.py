"""The scheduler harness with several worker ranks, as tensor parallelism runs kvtier.

vLLM's real Scheduler drives kvtier's leader (told the engine has ``num_ranks`` ranks); one
WORKER connector per rank owns its own KV tensors, host arena and disk directory
(``disk_dir/rank{N}``). Every step each rank executes the plan and answers as a vLLM worker
does; the answers are combined by vLLM's own ``KVOutputAggregator`` (a load is finished only
when every rank reported it; load errors are the union) before the scheduler sees them.

``lagging[rank]`` makes a rank slow: while it returns True for the step number, that rank
does not poll its background transfers (vLLM's ``get_finished``), so its disk reads and writes
finish, and are reported, steps later than the other ranks'.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from sched_harness import BLOCK, LAYERS, Harness, make_harness, token_pattern
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

from kvtier.connectors.vllm import KvtierConnector


@dataclass
class MultiRankHarness(Harness):
    workers: list[KvtierConnector] = field(default_factory=list)
    kvs: list[dict[str, torch.Tensor]] = field(default_factory=list)
    lagging: dict[int, Callable[[int], bool]] = field(default_factory=dict)
    num_steps: int = 0
    aggregator: KVOutputAggregator | None = None

    def step(self, before_worker=None) -> None:
        self.num_steps += 1
        so = self.scheduler.schedule()
        if before_worker is not None:
            before_worker(so)
        plan = so.kv_connector_metadata.plan
        for op in plan.loads:
            self._loads_to_verify[op.req_id] = op
        rank_outputs = []
        for connector in self.workers:
            connector.bind_connector_metadata(so.kv_connector_metadata)
            if so.has_sync_kv_loads:
                connector.start_load_kv(None)
        self._forward(so)
        for rank, connector in enumerate(self.workers):
            if not so.has_sync_kv_loads:
                connector.start_load_kv(None)
            connector.wait_for_save()
            sending, recving = None, None
            lag = self.lagging.get(rank)
            if lag is None or not lag(self.num_steps):
                sending, recving = connector.get_finished(so.finished_req_ids)
            invalid = connector.get_block_ids_with_load_errors()
            meta = connector.build_connector_worker_meta()
            connector.clear_connector_metadata()
            out = ModelRunnerOutput(req_ids=[], req_id_to_index={})
            out.kv_connector_output = KVConnectorOutput(
                finished_sending=sending, finished_recving=recving, invalid_block_ids=invalid,
                kv_connector_worker_meta=meta)
            rank_outputs.append(out)
        connector_output = self.aggregator.aggregate(rank_outputs).kv_connector_output
        invalid = connector_output.invalid_block_ids
        self.load_errors_seen |= invalid
        sync_done = [op.req_id for op in plan.loads if op.sync]
        for req_id in [*sync_done, *(connector_output.finished_recving or ())]:
            self._verify_loaded(req_id, invalid)
        self._sample(so, connector_output)

    @property
    def busy(self) -> bool:
        return any(c.worker.busy for c in self.workers)

    def run(self, timeout_s: float = 60.0) -> None:
        """Step until every request finished. Bounded in wall time, not in steps: a request
        may wait for a deadline the leader measures in wall time (a lagging rank's probe
        answer), which a fast machine would not reach within a fixed number of steps."""
        deadline = time.monotonic() + timeout_s
        while self.scheduler.requests:
            if time.monotonic() > deadline:
                raise AssertionError(f"requests still pending after {timeout_s:.0f} s: "
                                     f"{list(self.scheduler.requests)}")
            self.step()
            time.sleep(0.001)

    def drain(self) -> None:
        self.lagging.clear()
        for _ in range(2000):
            for c in self.workers:
                c.worker.poll()
            if not (self.busy or self.leader.busy):
                break
            self.step()
            time.sleep(0.001)
        self.step()

    def shutdown(self) -> None:
        for c in self.workers:
            c.shutdown()

    def block_ok(self, block_id: int, tokens: list[int], first_pos: int) -> bool:
        """The block holds the right bytes on every rank."""
        return all(self._block_ok_on(kv, block_id, tokens, first_pos) for kv in self.kvs)

    @staticmethod
    def _block_ok_on(kv, block_id: int, tokens: list[int], first_pos: int) -> bool:
        positions = torch.arange(first_pos, first_pos + BLOCK)
        toks = torch.tensor(tokens[first_pos:first_pos + BLOCK])
        for layer, name in enumerate(LAYERS):
            want = token_pattern(toks, positions, layer).permute(1, 0, 2)
            if not torch.equal(kv[name][block_id], want):
                return False
        return True

    def _forward(self, so) -> None:
        for kv in self.kvs:   # every rank computes (its shard of) the same tokens
            self.kv = kv
            Harness._forward(self, so)
        self.kv = self.kvs[0]


def make_multirank_harness(model_dir: str, extra: dict, *, num_ranks: int = 2,
                           **kw) -> MultiRankHarness:
    """``make_harness`` with ``num_ranks`` workers; the leader expects that many reports."""
    base = make_harness(model_dir, extra, **kw)
    scheduler = base.scheduler
    leader = scheduler.connector.leader
    # The leader learns the world size from vLLM's parallel config; a CPU VllmConfig cannot
    # ask for two ranks (no devices), so the harness tells it directly.
    leader.ops.world_size = num_ranks
    vc = scheduler.vllm_config
    kvc = scheduler.kv_cache_config
    base.worker.shutdown()   # one worker per rank instead, each with its own rank
    workers, kvs = [], []
    for rank in range(num_ranks):
        vc.parallel_config.rank = rank
        kv = {name: torch.zeros_like(t) for name, t in base.kv.items()}
        connector = KvtierConnector(vc, KVConnectorRole.WORKER, kvc)
        connector.register_kv_caches(kv)
        workers.append(connector)
        kvs.append(kv)
    vc.parallel_config.rank = 0
    return MultiRankHarness(scheduler, workers[0], kvs[0], base.num_blocks, workers=workers,
                            kvs=kvs, aggregator=KVOutputAggregator(num_ranks))
