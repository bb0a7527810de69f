"""A model-free engine loop: vLLM's real v1 Scheduler + kvtier's connector in both roles.

The scheduler side is vLLM's own ``Scheduler`` with ``KvtierConnector`` loaded by module path;
the worker side is a second ``KvtierConnector`` (WORKER role) registered on real CPU tensors
shaped as the CPU build of vLLM hands them over. Instead of a model, each "forward pass"
writes a deterministic pattern for every computed token into its KV slot, so the bytes any
load brings back can be checked exactly: a block is right iff it holds the pattern of the
tokens at its positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from kvtier.connectors.vllm import KvtierConnector

BLOCK = 16
NUM_LAYERS = 2
HEADS = 2
HEAD = 32
EOS = 2
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]


def token_pattern(token_ids: torch.Tensor, positions: torch.Tensor, layer: int) -> torch.Tensor:
    """The KV a token would get: a deterministic function of (token, position, layer),
    shaped (n, HEADS, 2 * HEAD) in bf16 (values exact in bf16: small integers)."""
    base = (token_ids * 7 + positions * 3 + layer * 11) % 251
    lanes = torch.arange(HEADS * 2 * HEAD).reshape(1, HEADS, 2 * HEAD)
    return ((base.reshape(-1, 1, 1) + lanes) % 256).to(torch.bfloat16)


@dataclass
class Harness:
    scheduler: Scheduler
    worker: KvtierConnector | None
    kv: dict[str, torch.Tensor]
    num_blocks: int
    outputs: dict[str, list[int]] = field(default_factory=dict)
    load_errors_seen: set[int] = field(default_factory=set)
    verified_loads: int = 0
    _loads_to_verify: dict = field(default_factory=dict)

    @property
    def leader(self):
        return self.scheduler.connector.leader

    def add(self, req_id: str, prompt: list[int], max_tokens: int = 4,
            cache_salt: str | None = None, priority: int = 0) -> Request:
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        sp.update_from_generation_config({}, EOS)
        req = Request(req_id, prompt, sp, pooling_params=None, cache_salt=cache_salt,
                      block_hasher=get_request_block_hasher(BLOCK, sha256), priority=priority)
        self.scheduler.add_request(req)
        return req

    def step(self, before_worker=None) -> None:
        so = self.scheduler.schedule()
        if before_worker is not None:
            before_worker(so)
        connector_output = None
        if self.worker is None:
            self._forward(so)
        else:
            for op in so.kv_connector_metadata.plan.loads:
                self._loads_to_verify[op.req_id] = op
            self.worker.bind_connector_metadata(so.kv_connector_metadata)
            # As vLLM's model runner: synchronous loads feed this step's forward pass, so they
            # start before it; asynchronous ones start after it.
            if so.has_sync_kv_loads:
                self.worker.start_load_kv(None)
            self._forward(so)
            if not so.has_sync_kv_loads:
                self.worker.start_load_kv(None)
            self.worker.wait_for_save()
            finished_sending, finished_recving = self.worker.get_finished(so.finished_req_ids)
            invalid = self.worker.get_block_ids_with_load_errors()
            self.load_errors_seen |= invalid
            wmeta = self.worker.build_connector_worker_meta()
            self.worker.clear_connector_metadata()
            sync_done = [op.req_id for op in so.kv_connector_metadata.plan.loads if op.sync]
            for req_id in [*sync_done, *(finished_recving or ())]:
                self._verify_loaded(req_id, invalid)
            connector_output = KVConnectorOutput(
                finished_sending=finished_sending, finished_recving=finished_recving,
                invalid_block_ids=invalid, kv_connector_worker_meta=wmeta)
        self._sample(so, connector_output)

    def _sample(self, so, connector_output) -> None:
        """The model's sampling step: one token for every request whose prompt is computed,
        handed to the scheduler with the step's connector output."""
        req_ids = list(so.num_scheduled_tokens)
        sampled = []
        for req_id in req_ids:
            req = self.scheduler.requests[req_id]
            done_prompt = req.num_computed_tokens >= req.num_prompt_tokens
            sampled.append([self._next_token(req)] if done_prompt else [])
        out = ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled, logprobs=None, prompt_logprobs_dict={},
            pooler_output=[], kv_connector_output=connector_output)
        engine_outputs = self.scheduler.update_from_output(so, out)
        for eco in engine_outputs.values():
            for o in eco.outputs:
                self.outputs.setdefault(o.request_id, []).extend(o.new_token_ids)

    def run(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.requests:
                return
            self.step()
            if self.worker is not None and self.worker.worker.busy:
                time.sleep(0.001)
        raise AssertionError(f"requests still pending after {max_steps} steps: "
                             f"{list(self.scheduler.requests)}")

    def drain(self) -> None:
        """Finish background transfers and hand their results to the leader."""
        for _ in range(2000):
            self.worker.worker.poll()
            if not (self.worker.worker.busy or self.leader.busy):
                break
            self.step()
            time.sleep(0.001)
        self.step()

    def block_ok(self, block_id: int, tokens: list[int], first_pos: int) -> bool:
        positions = torch.arange(first_pos, first_pos + BLOCK)
        toks = torch.tensor(tokens[first_pos:first_pos + BLOCK])
        for layer, name in enumerate(LAYERS):
            want = token_pattern(toks, positions, layer).permute(1, 0, 2)
            if not torch.equal(self.kv[name][block_id], want):
                return False
        return True

    def assert_no_leaks(self) -> None:
        self.drain()
        pool = self.scheduler.kv_cache_manager.block_pool
        assert pool.get_num_free_blocks() == self.num_blocks - 1, "vLLM device blocks leaked"
        leader = self.leader
        leader.check_invariants()
        for tier_pool in (leader.g2, leader.g3):
            if tier_pool is not None:
                assert tier_pool.num_active == 0, f"{tier_pool.tier.name} blocks still pinned"
        assert not leader.busy

    # -- internals ----------------------------------------------------------------------
    def _forward(self, so) -> None:
        for req_id, n in so.num_scheduled_tokens.items():
            req = self.scheduler.requests[req_id]
            block_ids = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
            start = req.num_computed_tokens - n  # the scheduler already advanced it
            positions = torch.arange(start, start + n)
            toks = torch.tensor(req.all_token_ids[start:start + n])
            blocks = torch.tensor(block_ids)[positions // BLOCK]
            offsets = positions % BLOCK
            for layer, name in enumerate(LAYERS):
                self.kv[name][blocks, :, offsets, :] = token_pattern(toks, positions, layer)

    @staticmethod
    def _tokens_of(req: Request) -> list[int]:
        """What a request's KV is a function of (a subclass adds images or embeddings)."""
        return req.all_token_ids

    def _verify_loaded(self, req_id: str, invalid: set[int]) -> None:
        """Every block a finished load wrote (and did not report failed) holds exactly the
        pattern of the request's tokens at that block's positions."""
        op = self._loads_to_verify.pop(req_id, None)
        req = self.scheduler.requests.get(req_id)
        if op is None or req is None or RequestStatus.is_finished(req.status):
            return
        table = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
        for dev in op.device_block_ids:
            if dev in invalid:
                continue
            i = table.index(dev)
            assert self.block_ok(dev, self._tokens_of(req), i * BLOCK), (
                f"request {req_id}: loaded block {i} (device block {dev}) holds wrong bytes")
            self.verified_loads += 1

    @staticmethod
    def _next_token(req: Request) -> int:
        return 3 + (sum(req.all_token_ids[-4:]) * 31 + len(req.all_token_ids)) % 1000


def make_harness(model_dir: str, extra: dict, *, num_blocks: int = 256,
                 max_batched_tokens: int = 4096, max_model_len: int = 4096,
                 max_num_seqs: int = 16, policy: str = "fcfs") -> Harness:
    init_none_hash(sha256)
    model_config = ModelConfig(model=model_dir, max_model_len=max_model_len)
    scheduler_config = SchedulerConfig(max_num_seqs=max_num_seqs,
                                       max_num_batched_tokens=max_batched_tokens,
                                       max_model_len=max_model_len,
                                       enable_chunked_prefill=True, is_encoder_decoder=False,
                                       policy=policy)
    cache_config = CacheConfig(block_size=BLOCK, enable_prefix_caching=True)
    # extra=None: vLLM alone, the baseline for measuring what the connector adds.
    kv_transfer = None if extra is None else KVTransferConfig(
        kv_connector="KvtierConnector", kv_connector_module_path="kvtier.connectors.vllm",
        kv_role="kv_both", kv_connector_extra_config=extra)
    vc = VllmConfig(model_config=model_config, scheduler_config=scheduler_config,
                    cache_config=cache_config, device_config=DeviceConfig("cpu"),
                    kv_transfer_config=kv_transfer)
    vc.cache_config.num_gpu_blocks = num_blocks
    kvc = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(LAYERS, FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS,
                                                   head_size=HEAD, dtype=torch.bfloat16))])
    scheduler = Scheduler(vllm_config=vc, kv_cache_config=kvc, log_stats=True,
                          structured_output_manager=StructuredOutputManager(vc),
                          block_size=BLOCK)
    kv = {name: torch.zeros(num_blocks, HEADS, BLOCK, 2 * HEAD, dtype=torch.bfloat16)
          for name in LAYERS}
    worker = None
    if kv_transfer is not None:
        worker = KvtierConnector(vc, KVConnectorRole.WORKER, kvc)
        worker.register_kv_caches(kv)
    return Harness(scheduler, worker, kv, num_blocks)
