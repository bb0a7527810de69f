"""kvtier as a TensorRT-LLM KV cache connector: a thin adapter over kvtier's Leader and Worker.

Mirrors the connector API of **tensorrt-llm 1.2.x** (PyTorch backend,
``tensorrt_llm/_torch/pyexecutor/kv_cache_connector.py``: ``KvCacheConnectorScheduler`` and
``KvCacheConnectorWorker`` built with ``llm_args``, ``SchedulerOutput`` of ``RequestData``).
Enable it in the LLM API YAML::

    kv_connector_config:
      connector_module: kvtier.connectors.trtllm
      connector_scheduler_class: KvtierConnectorScheduler
      connector_worker_class: KvtierConnectorWorker

TensorRT-LLM's connector config has no free-form settings, so kvtier reads its own from
``KVTIER_*`` environment variables or the file named by ``KVTIER_CONFIG`` (``host_cache_gb``,
``disk_cache_gb`` with ``disk_dir``, ``remote_url``, ...). Only ``TLLM*``/``TRTLLM*`` variables
reach MPI-spawned workers, so for TP > 1 put them in the file and export ``KVTIER_CONFIG`` in the
launcher's environment, or run with ``mpirun -x``.

This module imports ``tensorrt_llm`` only to subclass its two abstract classes; without it the
same classes stand on plain bases with the same methods, so the adapter runs and is tested on
machines where TensorRT-LLM cannot be installed.

How the halves talk
-------------------
Plans go down as TensorRT-LLM intends: ``build_connector_meta`` returns a picklable
``KvtierTrtllmMetadata`` (kvtier's ``StepPlan`` plus which store operations touch which
request's blocks) that the runtime broadcasts and binds on every rank.

Reports come back without an engine channel: TensorRT-LLM (unlike vLLM, whose workers return
connector metadata every step) has none from workers to the scheduler, and ``get_finished`` can
carry only request ids the runtime already gave the worker. So:

* the scheduler lives only on rank 0, in the same process as rank 0's worker; they share a
  process-local ``_Rank0Link`` (one engine per process, as TensorRT-LLM runs one executor per
  rank process; a new scheduler opens it afresh);
* every worker takes its ``WorkerReport`` in ``get_finished``. With one rank it is posted to the
  link directly; with several, the ranks all-gather their reports over the runtime's own MPI
  communicator (``tensorrt_llm._utils.mpi_allgather``) and rank 0 posts them. ``get_finished``
  is called on every rank each iteration, immediately before the runtime's own all-gather of
  finished ids, so one more collective there keeps every rank's collectives in the same order;
* ``build_connector_meta`` hands the posted reports to ``Leader.on_reports`` before planning, so
  an operation commits once every rank has reported it, exactly as with vLLM.

The leader needs the size of one block, which only the registered pool tells: rank 0's worker
publishes it on the link in ``register_kv_caches`` (the runtime registers the pool before the
first request) and the scheduler builds its leader on first use.

Timing relied on (1.2.x executor loop): ``start_load_kv`` runs before the forward pass,
``wait_for_save`` after it is enqueued, then responses (``request_finished``), then
``get_finished``. Offloads copy whole blocks, every layer at once, in ``wait_for_save`` after
synchronising the forward stream, so ``wait_for_layer_load``/``save_kv_layer`` do nothing.
``request_finished`` returns True while an asynchronous load writes the request's blocks or a
planned store of them has not been reported by every rank; each rank then names the request in
``get_finished`` once its own loads and stores of those blocks are done, and the runtime frees
the blocks when every rank has.

Limits of the 1.2.x API, said plainly: it has no channel for blocks that failed to load (vLLM's
``get_block_ids_with_load_errors``), so a block that fails verification is logged, counted and
dropped from its tier, but the engine computes on with that device block as it was; requests
with LoRA, multimodal inputs or prompt tables are served without kvtier (their ids are not
content keys kvtier can trust); TensorRT-LLM asks ``get_num_new_matched_tokens`` once per
request, so a match that would need another step (a disk index still loading) is a miss;
blocks are put to G4 (for other engines to share) but never loaded from it, since the store
may evict a block between the match and the read and a failed load cannot be recomputed; attention data parallelism and ``KVCacheManagerV2`` layouts are not
supported; KV events are TensorRT-LLM's own.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kvtier.config import KvtierConfig, load_config, redact_url
from kvtier.errors import ConfigError, KvtierError, LayoutError
from kvtier.hashing import RequestKeys
from kvtier.leader import Leader, plan_tier_layout
from kvtier.protocol import StepPlan, WorkerReport

if TYPE_CHECKING:
    import torch

    from kvtier.worker import Worker

logger = logging.getLogger(__name__)

TRTLLM_API_VERSION = "1.2"  # the tensorrt-llm release line whose connector API this mirrors

try:
    from tensorrt_llm._torch.pyexecutor.kv_cache_connector import (
        KvCacheConnectorScheduler as _SchedulerBase,
    )
    from tensorrt_llm._torch.pyexecutor.kv_cache_connector import (
        KvCacheConnectorWorker as _WorkerBase,
    )

    HAVE_TRTLLM = True
except ImportError:
    HAVE_TRTLLM = False

    class _SchedulerBase:  # type: ignore[no-redef]
        """Stand-in for ``KvCacheConnectorScheduler`` where tensorrt_llm is absent."""

        def __init__(self, llm_args: Any) -> None:
            self._llm_args = llm_args

    class _WorkerBase:  # type: ignore[no-redef]
        """Stand-in for ``KvCacheConnectorWorker`` where tensorrt_llm is absent: the same
        metadata binding the real base provides."""

        def __init__(self, llm_args: Any) -> None:
            self._llm_args = llm_args
            self._metadata = None

        def bind_connector_meta(self, metadata: object) -> None:
            self._metadata = metadata

        def get_connector_meta(self) -> object:
            return self._metadata

        def _clear_connector_meta(self) -> None:
            self._metadata = None

        def register_forward_pass_callable(self) -> Callable | None:
            return None


_POOL_NAME = "trtllm_kv_pool"
# Used for tier sizing when llm_args has no max_seq_len; both halves read the same llm_args.
_DEFAULT_MAX_SEQ_LEN = 32768


@dataclasses.dataclass(slots=True)
class KvtierTrtllmMetadata:
    """One step's plan for every rank (broadcast by the runtime; plain picklable data)."""

    plan: StepPlan
    # Request id -> operation ids of this plan's stores (G1 -> G2) that read its device blocks.
    saves: dict[str, list[int]] = dataclasses.field(default_factory=dict)


class _Rank0Link:
    """What the scheduler and rank 0's worker share inside rank 0's process."""

    def __init__(self) -> None:
        self.block_bytes = 0  # one rank's bytes per block, from rank 0's registered pool
        self._reports: list[WorkerReport] = []

    def open(self) -> None:
        """A new engine in this process: forget the last one's pool and reports."""
        self.block_bytes = 0
        self._reports = []

    def post(self, reports: Sequence[WorkerReport]) -> None:
        self._reports.extend(reports)

    def take(self) -> list[WorkerReport]:
        reports, self._reports = self._reports, []
        return reports


_LINK = _Rank0Link()


# ==================================  scheduler side  ==================================
@dataclasses.dataclass(slots=True)
class _Request:
    tokens: list[int]
    block_ids: list[int]
    num_external: int = 0  # tokens promised by the last match, for update_state_after_alloc


class KvtierConnectorScheduler(_SchedulerBase):
    """Rank 0's half: drives kvtier's ``Leader`` from TensorRT-LLM's scheduler callbacks."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self.config = _load()
        _refuse_unsupported(llm_args)
        _, self.world_size = _parallel(llm_args)
        self.block_tokens = _tokens_per_block(llm_args)
        self._max_blocks = _max_blocks(llm_args, self.block_tokens)
        self._link = _LINK
        self._link.open()
        self.leader: Leader | None = None
        self._requests: dict[str, _Request] = {}
        self._reports: list[WorkerReport] = []  # posted, not yet given to the leader
        # Device block -> live requests holding it (TensorRT-LLM shares reused prefix blocks).
        self._holders: dict[int, set[str]] = {}
        # Request -> its store operations some rank has not reported yet; per store operation
        # the requests it reads and how many ranks reported it.
        self._saving: dict[str, set[int]] = {}
        self._store_readers: dict[int, list[str]] = {}
        self._store_reports: dict[int, int] = {}
        self._idle_logged = False

    def get_num_new_matched_tokens(self, request: Any,
                                   num_computed_tokens: int) -> tuple[int, bool]:
        leader = self._leader()
        if leader is None:
            return 0, False
        req_id = str(request.request_id)
        tokens = list(request.get_tokens(0))
        num_tokens = leader.match(req_id, tokens, num_computed_tokens,
                                  keys=_request_keys(request))
        # None asks to be asked again next step; TensorRT-LLM asks once: a miss.
        if not num_tokens:
            return 0, False  # never (0, True): the runtime rejects it
        self._requests[req_id] = _Request([], [], num_external=num_tokens)
        return num_tokens, leader.is_async_load(req_id)

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        req_id = str(request.request_id)
        req = self._requests.get(req_id)
        if req is not None and req.num_external:
            # block_ids is the request's whole block table (device-reused prefix included).
            self.leader.begin_onboard(req_id, list(block_ids), req.num_external)
            req.num_external = 0

    def build_connector_meta(self, scheduler_output: Any) -> KvtierTrtllmMetadata:
        leader = self._leader()
        self._collect()
        if leader is not None:
            leader.on_reports(self._reports)
            self._reports = []
        num_prefill = 0
        for is_new, data in _request_data(scheduler_output):
            req_id = str(data.request_id)
            req = self._requests.get(req_id)
            if req is None:
                req = self._requests[req_id] = _Request([], [])
            req.tokens.extend(data.new_tokens)
            for block in data.new_block_ids:
                req.block_ids.append(block)
                self._holders.setdefault(block, set()).add(req_id)
            if is_new or data.num_scheduled_tokens > 1:
                num_prefill += data.num_scheduled_tokens
            # computed_position counts tokens with valid KV before this step (for a new
            # request, less the tokens kvtier loads); the step computes num_scheduled_tokens.
            num_valid = data.computed_position + data.num_scheduled_tokens
            if leader is not None:
                leader.progress(req_id, req.tokens, num_valid, req.block_ids)
        if leader is None:
            return KvtierTrtllmMetadata(StepPlan())
        leader.begin_step(num_prefill)
        plan = leader.take_plan()
        saves: dict[str, list[int]] = {}
        for block, op_id in zip(plan.stores.src, plan.stores.op_ids):
            readers = list(self._holders.get(block, ()))
            self._store_readers[op_id] = readers
            self._store_reports[op_id] = 0
            for req_id in readers:
                saves.setdefault(req_id, []).append(op_id)
                self._saving.setdefault(req_id, set()).add(op_id)
        return KvtierTrtllmMetadata(plan, saves)

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        req_id = str(request.request_id)
        self._collect()
        req = self._requests.pop(req_id, None)
        for block in req.block_ids if req is not None else ():
            holders = self._holders.get(block)
            if holders is not None:
                holders.discard(req_id)
                if not holders:
                    del self._holders[block]
        loading = self.leader.finish(req_id) if self.leader is not None else False
        saving = bool(self._saving.pop(req_id, None))
        return loading or saving

    def _collect(self) -> None:
        """Take the reports posted since the last call; note which stores every rank did."""
        reports = self._link.take()
        for report in reports:
            for op_id in (*report.ops_ok, *report.ops_failed):
                count = self._store_reports.get(op_id)
                if count is None:
                    continue  # not a store (disk write, remote put)
                if count + 1 < self.world_size:
                    self._store_reports[op_id] = count + 1
                    continue
                del self._store_reports[op_id]
                for req_id in self._store_readers.pop(op_id, ()):
                    pending = self._saving.get(req_id)
                    if pending is not None:
                        pending.discard(op_id)
                        if not pending:
                            del self._saving[req_id]
        self._reports.extend(reports)

    def _leader(self) -> Leader | None:
        """The leader, built on first use; None (kvtier idle, logged once) until rank 0's
        worker has registered its pool in this process."""
        if self.leader is None:
            block_bytes = self._link.block_bytes
            if not block_bytes:
                if not self._idle_logged:
                    self._idle_logged = True
                    logger.warning("kvtier: no KV pool registered in this process yet (rank "
                                   "0's worker registers it in register_kv_caches); kvtier "
                                   "matches and stores nothing until it is")
                return None
            # No loads from G4: the 1.2.x API cannot have a block recomputed whose load fails,
            # and the store may evict any block between the match and the read.
            self.leader = Leader(self.config, block_tokens=self.block_tokens,
                                 block_bytes=block_bytes, max_blocks_per_request=self._max_blocks,
                                 world_size=self.world_size, remote_loads=False)
            if self.config.metrics_port:
                self.leader.metrics.serve(self.config.metrics_port)
            layout = self.leader.layout
            logger.info("kvtier (TensorRT-LLM %s.x connector): G2 %d blocks, G3 %d blocks%s; "
                        "block %d tokens, %d B per rank over %d rank(s)", TRTLLM_API_VERSION,
                        layout.num_g2_slots, layout.num_g3_slots,
                        f", G4 {redact_url(self.config.remote_url)}"
                        if self.config.has_remote else "",
                        self.block_tokens, block_bytes, self.world_size)
        return self.leader


# ===================================  worker side  ===================================
class KvtierConnectorWorker(_WorkerBase):
    """Every rank's half: executes the bound plan with kvtier's ``Worker`` on this rank's
    pool and answers ``get_finished`` for this rank only."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self.config = _load()
        _refuse_unsupported(llm_args)
        self.rank, self.world_size = _parallel(llm_args)
        self.block_tokens = _tokens_per_block(llm_args)
        self._max_blocks = _max_blocks(llm_args, self.block_tokens)
        self._model_id = self.config.model_id or str(getattr(llm_args, "model", "") or "")
        self.worker: Worker | None = None
        self._allgather = _report_allgather(self.world_size)
        # Request -> operations (loads, stores) of this rank that use its device blocks.
        self._busy: dict[str, set[int]] = {}
        self._op_requests: dict[int, list[str]] = {}
        # Ids the runtime gave this rank and this rank has not returned yet (str -> given id).
        self._awaiting_save: dict[str, Any] = {}
        self._awaiting_load: dict[str, Any] = {}
        self._loaded: set[str] = set()  # asynchronous loads done on this rank
        # The bound plan, until start_load_kv / wait_for_save have run it.
        self._unstarted: KvtierTrtllmMetadata | None = None
        self._unsaved: KvtierTrtllmMetadata | None = None

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        from kvtier.layout import LayoutKind
        from kvtier.worker import Worker  # torch-side code only where the pool lives

        if kv_cache_tensor.dim() != 4:
            raise LayoutError(f"kvtier: TensorRT-LLM's KV pool should be [num_blocks, "
                              f"num_layers, kv_factor, block_elems], got shape "
                              f"{tuple(kv_cache_tensor.shape)}")
        block_bytes = kv_cache_tensor[0].numel() * kv_cache_tensor.element_size()
        if self.worker is not None:  # registered again (a new pool): start over
            self.worker.close()
        layout = plan_tier_layout(self.config, block_bytes, self._max_blocks, self.world_size)
        self.worker = Worker(self.config, layout, model_id=self._model_id, rank=self.rank)
        self.worker.register({_POOL_NAME: kv_cache_tensor}, self.block_tokens)
        kind = self.worker.device.geometry.layout
        if kind is not LayoutKind.TRTLLM_POOL:
            raise LayoutError(f"kvtier: pool of shape {tuple(kv_cache_tensor.shape)} read as "
                              f"{kind.name}, not a TensorRT-LLM pool (tokens_per_block "
                              f"{self.block_tokens})")
        if self.rank == 0:
            _LINK.block_bytes = block_bytes

    def bind_connector_meta(self, metadata: object) -> None:
        super().bind_connector_meta(metadata)
        meta = self._meta()
        if meta is None:
            return
        # From now on this rank owes the plan's loads and stores: freeing their requests'
        # blocks waits for them (get_finished).
        for op in meta.plan.loads:
            self._note_busy(op.req_id, op.op_id)
        for req_id, op_ids in meta.saves.items():
            for op_id in op_ids:
                self._note_busy(req_id, op_id)
        self._unstarted = self._unsaved = meta

    def start_load_kv(self, stream: Any) -> None:
        meta, self._unstarted = self._unstarted, None
        if meta is None:
            return
        if meta.plan.loads:
            _synchronize(stream)  # earlier forward passes are done with the blocks it writes
        self.worker.start_loads(meta.plan)

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        return  # loads are whole blocks, all layers, before the forward pass or between steps

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        return  # offloads copy whole blocks, all layers at once, in wait_for_save

    def wait_for_save(self, stream: Any) -> None:
        meta, self._unsaved = self._unsaved, None
        if meta is None:
            return
        if len(meta.plan.stores):
            _synchronize(stream)  # the forward pass has written what the plan stores
        self.worker.save(meta.plan)

    def get_finished(self, finished_gen_req_ids: list[int],
                     started_loading_req_ids: list[int]) -> tuple[list[int], list[int]]:
        report = None
        if self.worker is not None:
            # A bound plan whose calls the runtime skipped (no forward pass this iteration)
            # still runs, so no request waits on it; its stores name blocks computed earlier.
            if self._unstarted is not None:
                self.start_load_kv(self._device_stream())
            if self._unsaved is not None:
                self.wait_for_save(self._device_stream())
            self.worker.poll()
            report = self.worker.take_report()
            if report is not None:
                self._note_done(report)
            self._loaded.update(self.worker.take_finished_loads())
        self._send(report)
        for given in finished_gen_req_ids:
            self._awaiting_save[str(given)] = given
        for given in started_loading_req_ids:
            self._awaiting_load[str(given)] = given
        saved = [s for s in self._awaiting_save if not self._busy.get(s)]
        loaded = [s for s in self._awaiting_load if s in self._loaded]
        for s in loaded:
            self._loaded.discard(s)
        return ([self._awaiting_save.pop(s) for s in saved],
                [self._awaiting_load.pop(s) for s in loaded])

    def _meta(self) -> KvtierTrtllmMetadata | None:
        meta = self.get_connector_meta()
        if meta is None or self.worker is None:
            return None
        if not isinstance(meta, KvtierTrtllmMetadata):
            raise KvtierError(f"kvtier: bound connector metadata is a {type(meta).__name__}, "
                              "not kvtier's; is another connector's scheduler configured?")
        return meta

    def _device_stream(self) -> Any:
        """The pool device's current CUDA stream (None on CPU)."""
        device = self.worker.device.device
        if device.type != "cuda":
            return None
        import torch

        return torch.cuda.current_stream(device)

    def _note_busy(self, req_id: str, op_id: int) -> None:
        self._busy.setdefault(req_id, set()).add(op_id)
        self._op_requests.setdefault(op_id, []).append(req_id)

    def _note_done(self, report: WorkerReport) -> None:
        for result in report.loads:
            if result.failed_idx:
                # 1.2.x cannot hand blocks back for recompute (see the module docstring).
                logger.error("kvtier: request %s: %d of its loaded blocks did not arrive "
                             "intact on rank %d; TensorRT-LLM's connector API has no way to "
                             "recompute them", result.req_id, len(result.failed_idx),
                             self.rank)
        done = [*report.ops_ok, *report.ops_failed, *(r.op_id for r in report.loads)]
        for op_id in done:
            for req_id in self._op_requests.pop(op_id, ()):
                busy = self._busy.get(req_id)
                if busy is not None:
                    busy.discard(op_id)
                    if not busy:
                        del self._busy[req_id]

    def _send(self, report: WorkerReport | None) -> None:
        """This rank's report to the leader (see the module docstring)."""
        if self._allgather is not None:
            gathered = self._allgather(report)  # a collective: every rank, every call
            if self.rank == 0:
                _LINK.post([r for r in gathered if r is not None])
        elif report is not None:
            _LINK.post([report])


# ===================================  helpers  ===================================
def _load() -> KvtierConfig:
    config = load_config()
    if not (config.has_host or config.has_disk or config.has_remote):
        raise ConfigError("kvtier: no tier configured: set KVTIER_HOST_CACHE_GB (or "
                          "KVTIER_HOST_CACHE_BLOCKS), KVTIER_DISK_CACHE_GB with KVTIER_DISK_DIR, "
                          "and/or KVTIER_REMOTE_URL, or name a file in KVTIER_CONFIG")
    return config


def _refuse_unsupported(llm_args: Any) -> None:
    if getattr(llm_args, "enable_attention_dp", False):
        raise ConfigError("kvtier: TensorRT-LLM attention data parallelism is not supported "
                          "by the kvtier connector (it mirrors the 1.2.x API, rank-0 scheduler)")


def _parallel(llm_args: Any) -> tuple[int, int]:
    """(this process's rank, ranks that execute each plan), from TensorRT-LLM's mapping."""
    mapping = llm_args.parallel_config.to_mapping()
    return int(mapping.rank), int(mapping.world_size)


def _tokens_per_block(llm_args: Any) -> int:
    return int(llm_args.kv_cache_config.tokens_per_block)


def _max_blocks(llm_args: Any, block_tokens: int) -> int:
    max_seq_len = getattr(llm_args, "max_seq_len", None) or _DEFAULT_MAX_SEQ_LEN
    return -(-int(max_seq_len) // block_tokens)


def _request_keys(request: Any) -> RequestKeys:
    """What else the request's KV depends on. The cache salt is kept; LoRA adapters are named
    by task ids that need not be stable across processes, and multimodal or prompt-table
    inputs have no content key here, so such requests are served without kvtier."""
    salt = getattr(request, "cache_salt_id", None)
    unkeyable = None
    if getattr(request, "lora_task_id", None) is not None:
        unkeyable = "lora"
    elif getattr(request, "multimodal_hashes", None) or getattr(request, "py_multimodal_data",
                                                                None):
        unkeyable = "multimodal"
    elif getattr(request, "prompt_embedding_table", None) is not None:
        unkeyable = "prompt_table"
    return RequestKeys(cache_salt=None if salt is None else f"trtllm-salt-{salt}",
                       unkeyable=unkeyable)


def _request_data(scheduler_output: Any):
    for data in scheduler_output.new_requests:
        yield True, data
    for data in scheduler_output.cached_requests:
        yield False, data


def _report_allgather(world_size: int) -> Callable[[Any], list] | None:
    if world_size <= 1 or not HAVE_TRTLLM:
        return None  # one rank, or ranks in one process (tests): the link directly
    from tensorrt_llm._utils import mpi_allgather

    return mpi_allgather


def _synchronize(stream: Any) -> None:
    """Wait for the work enqueued on the forward pass's CUDA stream (None on CPU)."""
    synchronize = getattr(stream, "synchronize", None)
    if synchronize is not None:
        synchronize()
