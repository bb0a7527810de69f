"""The fault matrix as code: kvtier under vLLM's real scheduler, one fault per scenario.

Shared by the tests in this directory and by ``benchmarks/faults.py``. Each engine scenario
builds the integration harness (``tests/integration/sched_harness.py``: vLLM's v1 Scheduler,
kvtier's connector in both roles, real tiers), injects one fault (``kvtier.storage.faults`` hooks, real
file damage, real process kills or engine-side events), and returns an ``Outcome``: what a user
would care about (wrong tokens, wrong blocks, leaked blocks, hung requests) and how often the
fault showed up in kvtier's metrics or disk stats.

The ``remote_*`` scenarios drive a ``RetryingBackend`` on a real Redis directly (G4 is not wired
into the harness yet) and count wrong blocks the same way: reads reported good whose bytes
differ.

The harness "model" here makes every sampled token a function of the KV bytes of the whole
context (``FaultHarness._next_token``), so a single wrong byte onboarded anywhere changes the
output, as it would with a real model. The right output therefore needs no reference engine: it
follows from the tokens alone (``expected_tokens``), and a test asserting it can fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
import xxhash
from sched_harness import BLOCK, LAYERS, Harness, make_harness, token_pattern
from vllm.v1.request import RequestStatus

from kvtier.storage import faults

HERE = Path(__file__).resolve().parent
INTEGRATION = HERE.parent / "integration"


# -- the KV-dependent "model" ---------------------------------------------------------------------


def _digest(layers: list[torch.Tensor]) -> int:
    h = xxhash.xxh3_64()
    for kv in layers:
        h.update(kv.contiguous().view(torch.int16).numpy())
    return h.intdigest()


def _next_token(tokens: list[int], digest: int) -> int:
    return 3 + (digest ^ (sum(tokens[-4:]) * 31 + len(tokens))) % 1000


def expected_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    """What the model generates when every KV byte it reads is right."""
    tokens = list(prompt)
    out = []
    for _ in range(max_tokens):
        n = len(tokens)
        toks, pos = torch.tensor(tokens), torch.arange(n)
        tok = _next_token(tokens, _digest([token_pattern(toks, pos, layer)
                                           for layer in range(len(LAYERS))]))
        out.append(tok)
        tokens.append(tok)
    return out


class FaultHarness(Harness):
    """The integration harness whose sampled tokens depend on the KV bytes of the context, and
    which counts wrong onboarded blocks instead of stopping at the first."""

    wrong_blocks: int = 0
    wrong_block_notes: list

    def _next_token(self, req) -> int:  # overrides the harness's KV-blind static method
        n = len(req.all_token_ids)
        table = self.scheduler.kv_cache_manager.get_block_ids(req.request_id)[0]
        blocks = torch.tensor(table[:-(-n // BLOCK)])
        layers = []
        for name in LAYERS:
            kv = self.kv[name][blocks]  # (blocks, heads, BLOCK, 2*head)
            layers.append(kv.permute(0, 2, 1, 3).reshape(-1, kv.shape[1], kv.shape[3])[:n])
        return _next_token(req.all_token_ids, _digest(layers))

    def _verify_loaded(self, req_id: str, invalid: set[int]) -> None:
        try:
            super()._verify_loaded(req_id, invalid)
        except AssertionError as exc:
            self.wrong_blocks += 1
            self.wrong_block_notes.append(str(exc))


def make_fault_harness(model_dir: str, extra: dict | None, **kw) -> FaultHarness:
    h = make_harness(model_dir, extra, **kw)
    h.__class__ = FaultHarness
    h.wrong_blocks = 0
    h.wrong_block_notes = []
    return h


# -- workloads ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Spec:
    req_id: str
    prompt: list[int]
    max_tokens: int = 4
    salt: str | None = None


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 1000) for _ in range(n)]


def drive(h: Harness, specs: list[Spec], *, max_inflight: int = 16, max_steps: int = 3000,
          before_worker: Callable | None = None,
          after_step: Callable[[Harness, int], None] | None = None) -> list[str]:
    """Feed ``specs`` keeping at most ``max_inflight`` in the engine; step until all finish.

    Returns the ids of requests still unfinished after ``max_steps`` (hung), never raises for
    them. ``before_worker(so)`` runs between schedule and the worker, ``after_step(h, i)`` after
    each step.
    """
    queue = deque(specs)
    for step in range(max_steps):
        while queue and len(h.scheduler.requests) < max_inflight:
            s = queue.popleft()
            h.add(s.req_id, s.prompt, max_tokens=s.max_tokens, cache_salt=s.salt)
        if not h.scheduler.requests:
            return []
        h.step(before_worker=before_worker)
        if after_step is not None:
            after_step(h, step)
        if h.worker is not None and h.worker.worker.busy:
            time.sleep(0.001)
    return list(h.scheduler.requests) + [s.req_id for s in queue]


def count_leaks(h: Harness) -> int:
    """Blocks still held once everything should have ended: vLLM device blocks not back in
    the free pool plus kvtier tier blocks still pinned; tier pool invariants must hold."""
    if h.worker is not None:
        h.drain()
    leaked = (h.num_blocks - 1) - h.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    if h.worker is not None:
        h.leader.check_invariants()
        for pool in (h.leader.g2, h.leader.g3):
            if pool is not None:
                leaked += pool.num_active
        leaked += int(h.leader.busy)
    return leaked


def wrong_tokens(h: Harness, specs: list[Spec], skip: set[str] = frozenset()) -> int:
    """Output tokens that differ from the right ones (missing or extra ones count too)."""
    wrong = 0
    for s in specs:
        if s.req_id in skip:
            continue
        got = h.outputs.get(s.req_id, [])
        want = expected_tokens(s.prompt, s.max_tokens)
        wrong += sum(a != b for a, b in zip(got, want)) + abs(len(got) - len(want))
    return wrong


@dataclasses.dataclass
class Outcome:
    name: str
    requests: int = 0
    wrong_tokens: int = 0
    wrong_blocks: int = 0
    leaked_blocks: int = 0
    hung_requests: int = 0
    fault_count: float = 0.0   # how often the fault showed in kvtier's metrics / disk stats
    verified_loads: int = 0
    error: str = ""
    details: dict = dataclasses.field(default_factory=dict)

    @property
    def survived(self) -> bool:
        return not (self.wrong_tokens or self.wrong_blocks or self.leaked_blocks
                    or self.hung_requests or self.error)

    def explain(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str, indent=1)[:4000]


def close(h: Harness) -> None:
    if h.worker is not None:
        h.worker.shutdown()


def outcome(name: str, h: FaultHarness, specs: list[Spec], hung: list[str], *,
            fault_count: float, skip: set[str] = frozenset(), **details) -> Outcome:
    """The outcome of a run. Hung requests count as hung, not as wrong tokens; they are
    aborted first, so that the leak count shows blocks lost for good, not blocks a hung
    request still holds."""
    hung = list(dict.fromkeys(hung))
    skip = set(skip) | set(hung)
    for req_id in hung:
        if req_id in h.scheduler.requests:
            h.scheduler.finish_requests(req_id, RequestStatus.FINISHED_ABORTED)
    out = Outcome(name, requests=len(specs), hung_requests=len(hung),
                  wrong_tokens=wrong_tokens(h, specs, skip), wrong_blocks=h.wrong_blocks,
                  verified_loads=h.verified_loads, fault_count=fault_count, details=details)
    out.leaked_blocks = count_leaks(h)
    if h.wrong_block_notes:
        out.details["wrong_block_notes"] = h.wrong_block_notes[:3]
    if hung:
        out.details["hung"] = hung[:10]
    return out


def metric(h: Harness, name: str, **labels: str) -> float:
    return h.leader.metrics.value(name, **labels)


# -- configurations ---------------------------------------------------------------------------------


def disk_only(workdir: str | Path, blocks: int = 256) -> dict:
    """G3 only (G2 just stages), so every second-round hit is read from disk. Transfers of at
    most 2 blocks: many I/O calls, so a fault with a probability hits some blocks, not all."""
    return {"disk_cache_blocks": blocks, "disk_dir": str(Path(workdir) / "disk"),
            "disk_admission": "always", "onboard_mode": "always",
            "max_transfer_batch_blocks": 2}


def host_and_disk(workdir: str | Path, host: int = 64, disk: int = 256) -> dict:
    return {"host_cache_blocks": host, **disk_only(workdir, disk)}


def two_rounds(seed: int, num: int = 6, blocks: int = 6, tag: str = ""
               ) -> tuple[list[Spec], list[Spec]]:
    """Round one offloads ``num`` prompts; round two asks for the same prefixes again with a
    new tail (fresh requests whose prefix only kvtier's tiers can supply). Request ids are
    ``a<tag><i>`` and ``b<tag><i>``."""
    first = [Spec(f"a{tag}{i}", prompt(seed * 1000 + i, blocks * BLOCK + 3))
             for i in range(num)]
    second = [Spec(f"b{tag}{i}", s.prompt + prompt(seed * 1000 + 500 + i, 9))
              for i, s in enumerate(first)]
    return first, second


def offload_round(h: Harness, specs: list[Spec], **kw) -> list[str]:
    hung = drive(h, specs, **kw)
    h.drain()
    h.scheduler.reset_prefix_cache()  # the device forgets; only kvtier's tiers remember
    return hung


def disk_of(h: Harness):
    return h.worker.worker.disk


# -- disk faults through the hook -----------------------------------------------------------------


def _hooked_disk(name: str, point: str, kind: str, *, during: str, counted: Callable,
                 model_dir: str, workdir: str, seed: int, probability: float = 0.3) -> Outcome:
    """Two rounds of 8 requests on a disk-only tier with ``point:kind`` armed during the
    offload round ("write") or the onboard round ("read"). Which I/O call a fault hits depends
    on thread timing; with ~30 calls at p=0.3 some fail and some succeed in every run."""
    h = make_fault_harness(model_dir, disk_only(workdir))
    first, second = two_rounds(seed, num=8)
    try:
        if during == "write":
            with faults.armed(point, kind, probability=probability, seed=seed) as rule:
                hung = offload_round(h, first)
            hung += drive(h, second)
        else:
            hung = offload_round(h, first)
            with faults.armed(point, kind, probability=probability, seed=seed) as rule:
                hung += drive(h, second)
        return outcome(name, h, first + second, hung, fault_count=counted(h),
                       injected=rule.fired, disk_stats=disk_of(h).stats.as_dict(),
                       g3_hits=metric(h, "kvtier_matched_blocks", tier="G3"))
    finally:
        close(h)


def disk_enospc_write(model_dir, workdir, seed=1):
    return _hooked_disk("disk_enospc_write", "disk.write", "enospc", during="write",
                        counted=lambda h: metric(h, "kvtier_dropped_offloads", tier="G3"),
                        model_dir=model_dir, workdir=workdir, seed=seed)


def disk_eio_write(model_dir, workdir, seed=2):
    return _hooked_disk("disk_eio_write", "disk.write", "eio", during="write",
                        counted=lambda h: metric(h, "kvtier_dropped_offloads", tier="G3"),
                        model_dir=model_dir, workdir=workdir, seed=seed)


def disk_short_write(model_dir, workdir, seed=3):
    return _hooked_disk("disk_short_write", "disk.write", "short", during="write",
                        counted=lambda h: metric(h, "kvtier_dropped_offloads", tier="G3"),
                        model_dir=model_dir, workdir=workdir, seed=seed)


def disk_fsync_eio(model_dir, workdir, seed=4):
    return _hooked_disk("disk_fsync_eio", "disk.sync", "eio", during="write",
                        counted=lambda h: metric(h, "kvtier_dropped_offloads", tier="G3"),
                        model_dir=model_dir, workdir=workdir, seed=seed)


def disk_eio_read(model_dir, workdir, seed=5):
    return _hooked_disk("disk_eio_read", "disk.read", "eio", during="read",
                        counted=lambda h: metric(h, "kvtier_load_errors"),
                        model_dir=model_dir, workdir=workdir, seed=seed)


def disk_short_read(model_dir, workdir, seed=6):
    return _hooked_disk("disk_short_read", "disk.read", "short", during="read",
                        counted=lambda h: metric(h, "kvtier_load_errors"),
                        model_dir=model_dir, workdir=workdir, seed=seed)


def disk_flip_in_transit(model_dir, workdir, seed=7):
    return _hooked_disk("disk_flip_in_transit", "disk.read", "flip", during="read",
                        counted=lambda h: metric(h, "kvtier_checksum_failures"),
                        model_dir=model_dir, workdir=workdir, seed=seed)


# -- real damage to the disk tier's files -----------------------------------------------------------


def _verified_byte_offsets(slot_bytes: int, payload_bytes: int) -> list[int]:
    """Offsets in a slot that verification covers: the header minus its reserved flags
    (bytes 6-7), and the payload."""
    return [o for o in range(64 + payload_bytes) if o not in (6, 7)]


def disk_bytes_flipped(model_dir, workdir, seed=8):
    """Real corruption: one byte flipped in the data file in half the stored blocks, at a
    random verified offset (header field or payload)."""
    h = make_fault_harness(model_dir, disk_only(workdir))
    first, second = two_rounds(seed)
    rng = random.Random(seed)
    try:
        hung = offload_round(h, first)
        disk = disk_of(h)
        offsets = _verified_byte_offsets(disk.slot_bytes, h.worker.worker.arena.payload_bytes)
        stored = [slot for slot, _key in disk.recover()]
        damaged = rng.sample(stored, max(1, len(stored) // 2))
        with open(disk.data_path, "r+b") as f:
            for slot in damaged:
                pos = slot * disk.slot_bytes + rng.choice(offsets)
                f.seek(pos)
                byte = f.read(1)[0]
                f.seek(pos)
                f.write(bytes([byte ^ rng.randrange(1, 256)]))
            f.flush()
            os.fsync(f.fileno())
        hung += drive(h, second)
        return outcome("disk_bytes_flipped", h, first + second, hung,
                       fault_count=metric(h, "kvtier_checksum_failures"),
                       damaged_blocks=len(damaged), stored_blocks=len(stored))
    finally:
        close(h)


def disk_file_truncated(model_dir, workdir, seed=9):
    """The data file loses its tail while the tier runs; later offloads extend it again."""
    h = make_fault_harness(model_dir, disk_only(workdir))
    first, second = two_rounds(seed)
    third_a, third_b = two_rounds(seed + 100, num=3, tag="x")
    try:
        hung = offload_round(h, first)
        disk = disk_of(h)
        used = max(slot for slot, _ in disk.recover()) + 1
        os.truncate(disk.data_path, (used // 3) * disk.slot_bytes)
        hung += drive(h, second)
        hung += offload_round(h, third_a)
        hung += drive(h, third_b)
        return outcome("disk_file_truncated", h, first + second + third_a + third_b, hung,
                       fault_count=metric(h, "kvtier_load_errors"),
                       failed_reads=dict(disk.stats.failed_reads))
    finally:
        close(h)


def disk_dir_removed(model_dir, workdir, seed=10):
    """The disk tier's directory is deleted while the engine runs, then the engine restarts
    on the same path: nothing wrong is served, the restart starts the tier empty."""
    extra = disk_only(workdir)
    h = make_fault_harness(model_dir, extra)
    first, second = two_rounds(seed)
    try:
        hung = offload_round(h, first)
        shutil.rmtree(extra["disk_dir"])
        hung += drive(h, second)
        out = outcome("disk_dir_removed", h, first + second, hung, fault_count=0.0)
    finally:
        close(h)
    h2 = make_fault_harness(model_dir, extra)
    try:
        recovered = len(disk_of(h2).recover())
        again = [dataclasses.replace(s, req_id="c" + s.req_id[1:]) for s in second]
        hung2 = drive(h2, again)
        out2 = outcome("disk_dir_removed", h2, again, hung2, fault_count=0.0)
    finally:
        close(h2)
    out.requests += out2.requests
    out.wrong_tokens += out2.wrong_tokens
    out.wrong_blocks += out2.wrong_blocks
    out.leaked_blocks += out2.leaked_blocks
    out.hung_requests += out2.hung_requests
    # What shows the fault: the restarted tier recovered nothing and served no disk hit.
    out.fault_count = float(recovered == 0)
    out.details.update(recovered_after_restart=recovered,
                       g3_hits_after_restart=metric(h2, "kvtier_matched_blocks", tier="G3"))
    return out


# -- a crash for real ------------------------------------------------------------------------------

_CRASH_CHILD = r"""
import json, sys
sys.path[:0] = [{faults_dir!r}, {integration_dir!r}]
from kvtier.storage import faults
from fault_scenarios import crash_specs, disk_only, drive, make_fault_harness
# A slow fdatasync widens the window between a block's bytes and its journal record.
faults.arm("disk.sync", "delay", delay_s=0.01)
h = make_fault_harness({model_dir!r}, disk_only({workdir!r}))
for i, spec in enumerate(crash_specs()):
    hung = drive(h, [spec])
    h.step()
    print(json.dumps({{"done": i, "durable": h.leader.g3.num_registered, "hung": hung}}),
          flush=True)
"""


def crash_specs(num: int = 400) -> list[Spec]:
    return [Spec(f"k{i}", prompt(7000 + i, 5 * BLOCK + 1), max_tokens=2) for i in range(num)]


def disk_crash_restart(model_dir, workdir, seed=11, *, min_durable: int = 10,
                       start_timeout_s: float = 240.0):
    """A child process runs the harness and offloads to disk without pause; it is SIGKILLed at
    a random moment. A new harness on the same directory must recover only intact blocks and
    serve them byte-exact."""
    rng = random.Random(seed)
    workdir = str(workdir)
    code = _CRASH_CHILD.format(faults_dir=str(HERE), integration_dir=str(INTEGRATION),
                               model_dir=model_dir, workdir=workdir)
    log_path = Path(workdir) / "crash-child.log"
    with open(log_path, "wb") as log:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                 stderr=log, cwd=workdir)
    last: dict = {}
    try:
        deadline = time.monotonic() + start_timeout_s
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            last = json.loads(line)
            if last["durable"] >= min_durable:
                break
        if last.get("durable", 0) < min_durable:
            raise RuntimeError(f"crash child never stored {min_durable} blocks: {last}; "
                               f"log: {log_path.read_text()[-2000:]}")
        time.sleep(rng.uniform(0.0, 0.05))  # mid-offload: the next request is being written
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(30)
        child.stdout.close()
    if child.returncode != -signal.SIGKILL:
        raise RuntimeError(f"crash child ended with {child.returncode}, not SIGKILL")
    h = make_fault_harness(model_dir, disk_only(workdir))
    try:
        recovered = len(disk_of(h).recover())
        # Everything the child ran, and the one it was running.
        specs = crash_specs()[:last["done"] + 2]
        again = [dataclasses.replace(s, req_id="r" + s.req_id) for s in specs]
        hung = drive(h, again)
        out = outcome("disk_crash_restart", h, again, hung, fault_count=float(recovered),
                      durable_before_kill=last["durable"], recovered=recovered,
                      checksum_failures=metric(h, "kvtier_checksum_failures"),
                      g3_hits=metric(h, "kvtier_matched_blocks", tier="G3"))
    finally:
        close(h)
    # The warm-restart rule: the journal names only blocks whose bytes are intact.
    if out.details["checksum_failures"]:
        out.error = "a recovered block failed verification"
    if recovered < last["durable"]:
        out.error = f"recovered {recovered} blocks, fewer than the {last['durable']} durable"
    return out


# -- host tier --------------------------------------------------------------------------------------


def host_g2_exhausted(model_dir, workdir, seed=12):
    """A host tier of 8 blocks under 24 concurrent requests of 6 blocks: offloads are dropped
    and counted, nothing waits for room."""
    h = make_fault_harness(model_dir, {"host_cache_blocks": 8, "onboard_mode": "always"},
                           num_blocks=512)
    first, second = two_rounds(seed, num=24)
    alone, again = two_rounds(seed + 50, num=1, blocks=4, tag="solo")
    try:
        hung = offload_round(h, first, max_inflight=24)
        hung += drive(h, second, max_inflight=24)
        dropped = metric(h, "kvtier_dropped_offloads", tier="G2")
        # Once the pressure is gone the tier works again: a lone request is served from it.
        hung += offload_round(h, alone)
        hits_before = metric(h, "kvtier_matched_blocks", tier="G2")
        hung += drive(h, again)
        return outcome("host_g2_exhausted", h, first + second + alone + again, hung,
                       fault_count=dropped, dropped_under_load=dropped,
                       g2_hits_after_load=metric(h, "kvtier_matched_blocks", tier="G2")
                       - hits_before)
    finally:
        close(h)


def host_staging_exhausted(model_dir, workdir, seed=16, *, hold_steps: int = 40,
                           max_steps: int = 3000):
    """Every G2 slot is held (as in-flight offloads hold them under load) for ``hold_steps``
    engine steps while disk hits are to be onboarded: no staging slot, so every planned block
    fails and is recomputed. Once the slots come back, disk hits are served again."""
    h = make_fault_harness(model_dir, disk_only(workdir))
    first, second = two_rounds(seed)
    third = [dataclasses.replace(s, req_id="c" + s.req_id[1:]) for s in second]
    planned = 0
    held: list[int] = []

    def count_planned(so):
        nonlocal planned
        if held:
            planned += sum(len(op.keys) for op in so.kv_connector_metadata.plan.loads)

    def release_later(hh, step):
        if step + 1 == hold_steps and held:
            hh.leader.g2.release(held)
            held.clear()

    try:
        hung = offload_round(h, first)
        g2 = h.leader.g2
        held.extend(g2.allocate(g2.num_free + g2.num_inactive))
        errors_before = metric(h, "kvtier_load_errors")
        skipped_before = metric(h, "kvtier_onboard_skipped_blocks")
        hung += drive(h, second, before_worker=count_planned, after_step=release_later,
                      max_steps=max_steps)
        load_errors = metric(h, "kvtier_load_errors") - errors_before
        # Blocks not promised for want of a staging slot are recomputed and counted as skipped.
        skipped = metric(h, "kvtier_onboard_skipped_blocks") - skipped_before
        if held:
            g2.release(held)
            held.clear()
        g3_hits = metric(h, "kvtier_matched_blocks", tier="G3")
        h.scheduler.reset_prefix_cache()
        hung += drive(h, third)
        return outcome("host_staging_exhausted", h, first + second + third, hung,
                       fault_count=load_errors + skipped, planned_blocks=planned,
                       load_errors=load_errors, skipped_blocks=skipped,
                       g3_hits_after=metric(h, "kvtier_matched_blocks", tier="G3") - g3_hits)
    finally:
        close(h)


def host_evicted_before_pin(model_dir, workdir, seed=17):
    """The matched host blocks are gone by the time the engine reserved device blocks for them
    (as when other requests' staging evicts them within the same schedule): every promised
    block fails to pin and is recomputed, counted once as a load error."""
    h = make_fault_harness(model_dir, {"host_cache_blocks": 256, "onboard_mode": "always"})
    first, second = two_rounds(seed)
    leader = h.leader
    begin_onboard = leader.begin_onboard
    planned = 0

    def evict_then_begin(req_id, device_block_ids, num_external_tokens):
        nonlocal planned
        leader.reset()  # every cached block goes (the ones a transfer holds stay pinned)
        planned += num_external_tokens // BLOCK
        begin_onboard(req_id, device_block_ids, num_external_tokens)

    try:
        hung = offload_round(h, first)
        leader.begin_onboard = evict_then_begin
        hung += drive(h, second)
        return outcome("host_evicted_before_pin", h, first + second, hung,
                       fault_count=metric(h, "kvtier_load_errors"), planned_blocks=planned,
                       load_errors=metric(h, "kvtier_load_errors"))
    finally:
        leader.begin_onboard = begin_onboard
        close(h)


# -- engine events -----------------------------------------------------------------------------------


def engine_abort_mid_load(model_dir, workdir, seed=13):
    """Requests aborted between steps right after the step that planned their load, while
    slowed disk reads keep asynchronous loads in flight. The rest run correct, and the aborted
    prompts asked again afterwards are served right."""
    # Loads between steps: a load the leader would run inside the step leaves no window.
    h = make_fault_harness(model_dir, {**disk_only(workdir), "sync_load_max_ms": 0})
    first, second = two_rounds(seed, num=8)
    aborted: set[str] = set()
    planned_now: list[str] = []
    mid_load = 0

    def note_loads(so):
        planned_now.extend(op.req_id for op in so.kv_connector_metadata.plan.loads
                           if int(op.req_id[1:]) % 2 == 0)  # half the requests

    def abort_them(hh, step):
        nonlocal mid_load
        for req_id in planned_now:
            req = hh.scheduler.requests.get(req_id)
            if req is None:
                continue
            mid_load += req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
            hh.scheduler.finish_requests(req_id, RequestStatus.FINISHED_ABORTED)
            aborted.add(req_id)
        planned_now.clear()

    try:
        hung = offload_round(h, first)
        with faults.armed("disk.read", "delay", delay_s=0.1):
            hung += drive(h, second, before_worker=note_loads, after_step=abort_them)
        again = [dataclasses.replace(s, req_id="c" + s.req_id[1:]) for s in second
                 if s.req_id in aborted]
        hung += drive(h, again)
        return outcome("engine_abort_mid_load", h, first + second + again, hung,
                       fault_count=float(len(aborted)), skip=aborted, aborted=len(aborted),
                       aborted_while_loading=mid_load)
    finally:
        close(h)


def engine_preemption_storm(model_dir, workdir, seed=14):
    """A device cache far too small for the batch: requests are preempted again and again
    while kvtier offloads and onboards them."""
    h = make_fault_harness(model_dir, host_and_disk(workdir, host=128, disk=256), num_blocks=32,
                           max_batched_tokens=1024, max_num_seqs=16)
    specs = [Spec(f"p{i}", prompt(seed * 100 + i, 2 * BLOCK + i), max_tokens=5 * BLOCK)
             for i in range(16)]
    preempted = 0

    def count(so):
        nonlocal preempted
        preempted += len(so.preempted_req_ids or ())

    try:
        hung = drive(h, specs, max_steps=6000, before_worker=count)
        return outcome("engine_preemption_storm", h, specs, hung, fault_count=float(preempted),
                       preemptions=preempted,
                       tier_hits=metric(h, "kvtier_matched_blocks", tier="G2")
                       + metric(h, "kvtier_matched_blocks", tier="G3"))
    finally:
        close(h)


def engine_reset_during_transfers(model_dir, workdir, seed=15):
    """``reset_cache`` every few steps while stores, disk writes and loads are in flight."""
    h = make_fault_harness(model_dir, host_and_disk(workdir, host=32, disk=128))
    first, second = two_rounds(seed, num=8)
    resets = 0

    def reset(hh, step):
        nonlocal resets
        if step % 3 == 1 and hh.leader.busy:
            assert hh.scheduler.connector.reset_cache()
            resets += 1

    try:
        with faults.armed("disk.write", "delay", delay_s=0.005), \
                faults.armed("disk.read", "delay", delay_s=0.005):
            hung = offload_round(h, first[:4], after_step=reset)
            hung += drive(h, first[4:] + second, after_step=reset)
        return outcome("engine_reset_during_transfers", h, first + second, hung,
                       fault_count=float(resets), resets_while_busy=resets)
    finally:
        close(h)


# -- the remote tier (at the backend: G4 is not wired into the leader and worker yet) -----------------


def _remote_run(name: str, seed: int, *, rounds: int = 8, password: str | None = None,
                arm: Callable[[], list] = list, before_round: Callable | None = None,
                start_down: bool = False, timeout_s: float = 0.3) -> Outcome:
    """Rounds of put + get of 16 blocks through a ``RetryingBackend`` on a real Redis, with
    ``arm()``'s faults and ``before_round(round, server)`` events. Wrong blocks: reads reported
    good whose bytes differ; hung: rounds that did not return within 20 timeouts; leaked: a
    timed-out call still able to write into caller buffers once everything settled."""
    import threading

    import numpy as np
    from remote_cases import FINGERPRINT, make_blocks, views
    from servers import RedisServer

    from kvtier.storage.remote import RetryingBackend, make_namespace

    out = Outcome(name)
    server = RedisServer(password=password)
    server.start()
    if start_down:
        server.stop()
    tier = RetryingBackend(server.url, namespace=make_namespace(f"faults-{name}-{seed}",
                                                               FINGERPRINT),
                           timeout_s=timeout_s, initial_backoff_s=0.02, max_backoff_s=0.1)
    keys, rows = make_blocks(16, 4096 + 64, seed=seed)
    buf = np.zeros_like(rows)
    served_last = 0
    try:
        rules = arm()
        for rnd in range(rounds):
            if before_round is not None:
                before_round(rnd, server)
            if rnd == rounds - 1:
                faults.disarm()  # the last round shows whether the tier works again
                time.sleep(0.15)
            result: list = []

            def one_round(result=result):
                tier.maybe_reconnect()
                tier.batch_put(keys, views(rows))
                buf[:] = 0
                result.append(tier.batch_get_into(keys, views(buf)))

            t = threading.Thread(target=one_round, daemon=True)
            t.start()
            t.join(20 * timeout_s + 5)
            out.requests += 1
            if t.is_alive() or not result:
                out.hung_requests += 1
                continue
            ok = result[0]
            out.wrong_blocks += sum(1 for i, good in enumerate(ok)
                                    if good and not np.array_equal(buf[i], rows[i]))
            out.verified_loads += sum(ok)
            served_last = sum(ok)
        stats = tier.stats
        out.fault_count = float(stats["timeouts"] + stats["errors"] + stats["checksum_failures"]
                                + stats["unavailable"] + stats["put_failures"])
        out.details = {"stats": stats, "injected": sum(r.fired for r in rules),
                       "served_last_round": served_last}
        deadline = time.monotonic() + 10
        while not tier.drained and time.monotonic() < deadline:
            time.sleep(0.01)
        out.leaked_blocks = 0 if tier.drained else 1
        if served_last == 0:
            out.error = "the remote tier did not serve again after the fault"
    finally:
        faults.disarm()
        tier.close()
        server.close()
    return out


def remote_store_slow(model_dir, workdir, seed=21):
    return _remote_run("remote_store_slow", seed,
                       arm=lambda: [faults.arm("remote.get", "timeout", probability=0.5,
                                               seed=seed)])


def remote_partial_batch(model_dir, workdir, seed=22):
    return _remote_run("remote_partial_batch", seed, arm=lambda: [
        faults.arm("remote.put", "partial", seed=seed),
        faults.arm("remote.get", "partial", seed=seed + 1)])


def remote_corrupt_value(model_dir, workdir, seed=23):
    return _remote_run("remote_corrupt_value", seed, arm=lambda: [
        faults.arm("remote.get", "corrupt", probability=0.7, seed=seed)])


def remote_store_killed(model_dir, workdir, seed=24):
    def events(rnd, server):
        if rnd == 2:
            server.kill()
        elif rnd == 5:
            server.start()

    return _remote_run("remote_store_killed", seed, before_round=events,
                       password="bench-secret")


def remote_store_down_at_start(model_dir, workdir, seed=25):
    def events(rnd, server):
        if rnd == 3:
            server.start()

    return _remote_run("remote_store_down_at_start", seed, before_round=events,
                       start_down=True)


def _g4_engines(name: str, model_dir: str, seed: int, *, arm: Callable[[], list] = list,
                events: Callable | None = None, start_down: bool = False,
                damage: Callable | None = None, max_steps: int = 600) -> Outcome:
    """Two engine instances on one real Redis: A (host tier + G4) computes and offloads; B
    (G4 only) asks for the same prefixes with ``arm()``'s faults and ``events(b, step,
    server)`` after its steps (``damage(server, a, first)`` may alter the store before B
    starts). B must load what survives and recompute the rest: right tokens,
    no leak and no hang in either, the fault counted in B's metrics. Finally, faults gone and
    the store up (empty if it was killed), B offloads new prompts and loads them back from G4:
    the remote tier works again."""
    from servers import RedisServer

    server = RedisServer()
    server.start()
    remote = {"remote_url": server.url, "model_id": f"faults/{name}/{seed}",
              "onboard_mode": "always", "remote_timeout_ms": 300}
    first, second = two_rounds(seed)
    again_first, again_second = two_rounds(seed + 500, num=3, tag="z")
    a = b = None
    try:
        a = make_fault_harness(model_dir, {**remote, "host_cache_blocks": 256})
        hung = offload_round(a, first)
        if damage is not None:
            damage(server, a, first)
        if start_down:
            server.stop()
        b = make_fault_harness(model_dir, remote)
        rules = arm()
        hung += drive(b, second, after_step=(lambda h, i: events(h, i, server))
                      if events else None, max_steps=max_steps)
        injected = sum(r.fired for r in rules)
        faults.disarm()
        if hung:  # no recovery phase: report what hung
            out = outcome(name, b, second, hung, fault_count=_g4_counted(b),
                          injected=injected)
            out.leaked_blocks += count_leaks(a)
            return out
        if not server.pids:
            server.start()
        if not server.pids or server.pids and not _wait_healthy(b):
            raise RuntimeError("instance B never saw the store again")
        g4_before = metric(b, "kvtier_matched_blocks", tier="G4")
        hung += offload_round(b, again_first)
        hung += drive(b, again_second)
        counted = _g4_counted(b)
        out_a = outcome(name, a, first, [], fault_count=0.0)
        out = outcome(name, b, second + again_first + again_second, hung,
                      fault_count=counted, injected=injected,
                      g4_hits_after=metric(b, "kvtier_matched_blocks", tier="G4") - g4_before)
        out.wrong_tokens += out_a.wrong_tokens
        out.wrong_blocks += out_a.wrong_blocks
        out.leaked_blocks += out_a.leaked_blocks
        out.requests += out_a.requests
        if out.details["g4_hits_after"] == 0:
            out.error = "G4 never served again after the fault"
        return out
    finally:
        faults.disarm()
        for h in (a, b):
            if h is not None:
                close(h)
        server.close()


def _g4_counted(h) -> float:
    """Remote faults as kvtier's metrics show them."""
    return (sum(h.leader.metrics.value("kvtier_remote_events", event=e)
                for e in ("errors", "timeouts", "unavailable", "misses", "connect_failures"))
            + metric(h, "kvtier_checksum_failures") + metric(h, "kvtier_load_errors"))


def _wait_healthy(h, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        h.step()
        if h.leader.metrics.value("kvtier_remote_healthy") == 1:
            return True
        time.sleep(0.01)
    return False


def g4_partial_batch(model_dir, workdir, seed=31):
    return _g4_engines("g4_partial_batch", model_dir, seed, arm=lambda: [
        faults.arm("remote.get", "partial", probability=0.5, seed=seed)])


def _corrupt_stored_block(block_idx: int):
    """A ``damage`` hook: flip one payload byte of block ``block_idx`` of every prompt in the
    store itself (real bytes, as a bad disk or a buggy peer would leave them)."""
    from kvtier.hashing import salt_hash
    from kvtier.storage.remote import remote_key

    def damage(server, a, specs):
        raw = server.raw_client()
        namespace = a.worker.worker.remote.namespace
        for s in specs:
            key = a.leader.hasher.hash_blocks(s.prompt, salt=salt_hash(None, None))[block_idx]
            name = remote_key(namespace, key)
            value = raw.get(name)
            raw.setrange(name, 200, bytes([value[200] ^ 0xFF]))
        raw.close()

    return damage


def g4_corrupt_stored(model_dir, workdir, seed=36, block_idx: int = 2):
    return _g4_engines("g4_corrupt_stored", model_dir, seed,
                       damage=_corrupt_stored_block(block_idx))


def g4_corrupt_first_block(model_dir, workdir, seed=37):
    return _g4_engines("g4_corrupt_first_block", model_dir, seed,
                       damage=_corrupt_stored_block(0), max_steps=300)


def g4_store_slow(model_dir, workdir, seed=33):
    return _g4_engines("g4_store_slow", model_dir, seed, arm=lambda: [
        faults.arm("remote.get", "timeout", times=2, seed=seed)])


def g4_store_killed(model_dir, workdir, seed=34):
    def kill_once(h, step, server):
        if step == 1 and server.pids:
            server.kill()

    return _g4_engines("g4_store_killed", model_dir, seed, events=kill_once)


def g4_store_down_at_start(model_dir, workdir, seed=35):
    return _g4_engines("g4_store_down_at_start", model_dir, seed, start_down=True)


G4_SCENARIOS: dict[str, Callable[..., Outcome]] = {
    "g4_store_down_at_start": g4_store_down_at_start,
    "g4_store_killed": g4_store_killed,
    "g4_store_slow": g4_store_slow,
    "g4_partial_batch": g4_partial_batch,
    "g4_corrupt_stored": g4_corrupt_stored,
    "g4_corrupt_first_block": g4_corrupt_first_block,
}


REMOTE_SCENARIOS: dict[str, Callable[..., Outcome]] = {
    "remote_store_down_at_start": remote_store_down_at_start,
    "remote_store_killed": remote_store_killed,
    "remote_store_slow": remote_store_slow,
    "remote_partial_batch": remote_partial_batch,
    "remote_corrupt_value": remote_corrupt_value,
}


# -- the matrix -----------------------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[..., Outcome]] = {
    "disk_enospc_write": disk_enospc_write,
    "disk_eio_write": disk_eio_write,
    "disk_short_write": disk_short_write,
    "disk_fsync_eio": disk_fsync_eio,
    "disk_eio_read": disk_eio_read,
    "disk_short_read": disk_short_read,
    "disk_flip_in_transit": disk_flip_in_transit,
    "disk_bytes_flipped": disk_bytes_flipped,
    "disk_file_truncated": disk_file_truncated,
    "disk_dir_removed": disk_dir_removed,
    "disk_crash_restart": disk_crash_restart,
    "host_g2_exhausted": host_g2_exhausted,
    "host_staging_exhausted": host_staging_exhausted,
    "host_evicted_before_pin": host_evicted_before_pin,
    "engine_abort_mid_load": engine_abort_mid_load,
    "engine_preemption_storm": engine_preemption_storm,
    "engine_reset_during_transfers": engine_reset_during_transfers,
}


def run_scenario(name: str, model_dir: str, workdir: str | Path, seed: int | None = None
                 ) -> Outcome:
    """Run one scenario; an exception is an outcome too (not survived), never a crash."""
    fn = SCENARIOS.get(name) or G4_SCENARIOS.get(name) or REMOTE_SCENARIOS[name]
    try:
        return fn(model_dir, str(workdir)) if seed is None else fn(model_dir, str(workdir),
                                                                    seed)
    except Exception as exc:  # noqa: BLE001 - the report shows it
        return Outcome(name, error=f"{type(exc).__name__}: {exc}")
    finally:
        faults.disarm()
