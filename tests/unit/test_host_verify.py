"""G2 (host RAM) blocks are verified before they reach the device.

A Worker on CPU tensors shaped as vLLM hands them over, driven with real StepPlans (and, where
the test is about metrics and the G2 pool, by a real Leader). Device bytes are read straight
from the registered tensors, independently of kvtier's segment code; faults are armed by the
explicit calls of ``kvtier.storage.faults``.
"""

from __future__ import annotations

import pytest
import torch

from kvtier.config import load_config
from kvtier.errors import ConfigError
from kvtier.layout import DeviceKV
from kvtier.leader import Leader
from kvtier.protocol import NO_SLOT, LoadOp, StepPlan, TierLayout
from kvtier.storage import faults
from kvtier.storage.host import HostArena
from kvtier.transfer import copy_device_to_host, copy_host_to_device
from kvtier.transfer.copy import verify_slots
from kvtier.worker import Worker

NB, BS, H, D, LAYERS = 16, 16, 2, 32, 2
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
KEYS = [0x5EED0 + i for i in range(8)]


def make_kv(layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (NB, H, BS, 2 * D) if layout == "vllm_cpu" else (2, NB, BS, H, D)  # kv_first
    return {n: torch.randint(-2**15, 2**15, shape, dtype=torch.int16, generator=gen)
            .view(torch.bfloat16) for n in NAMES}


def device_block(kv: dict[str, torch.Tensor], block: int, num_blocks: int = NB) -> bytes:
    """Block ``block``'s bytes in payload order (layers, K before V), read from the tensors."""
    parts = []
    for t in kv.values():
        halves = [t[block]] if t.shape[0] == num_blocks else [t[0, block], t[1, block]]
        parts.extend(h.contiguous().view(torch.uint8).numpy().tobytes() for h in halves)
    return b"".join(parts)


def make_worker(kv, **extra) -> Worker:
    block_bytes = DeviceKV.from_tensors(kv, BS).geometry.block_bytes
    config = load_config({"host_cache_blocks": 8, **extra}, env={})
    worker = Worker(config, TierLayout(8, 0, block_bytes))
    worker.register(kv, BS)
    return worker


def store(worker: Worker, blocks: list[int], slots: list[int], keys: list[int]) -> None:
    plan = StepPlan()
    for block, slot, key in zip(blocks, slots, keys):
        plan.stores.add(block, slot, key, op_id=slot + 1)
    worker.save(plan)
    report = worker.take_report()
    assert report.ops_ok == [s + 1 for s in slots] and not report.ops_failed


def load(worker: Worker, blocks: list[int], slots: list[int], keys: list[int]):
    op = LoadOp("r", blocks, slots, [NO_SLOT] * len(blocks), keys, sync=True)
    worker.start_loads(StepPlan(loads=[op]))
    (result,) = worker.take_report().loads
    return result, worker.take_load_errors()


@pytest.fixture(autouse=True)
def _disarm():
    yield
    faults.disarm()


@pytest.fixture
def kv():
    return make_kv("vllm_cpu")


def zero_blocks(kv, blocks: list[int]) -> None:
    for t in kv.values():
        if t.shape[0] == NB:
            t[blocks] = 0
        else:
            t[:, blocks] = 0


# -- store stamps, load verifies --------------------------------------------------------------


def test_store_stamps_every_slot_with_its_key_and_payload_checksum(kv):
    worker = make_worker(kv)
    store(worker, [0, 1, 2], [4, 0, 7], KEYS[:3])
    fingerprint = worker.device.geometry.fingerprint(worker.model_id)
    for slot, key, block in zip([4, 0, 7], KEYS[:3], [0, 1, 2]):
        assert worker.arena.check(slot, key, fingerprint) is None
        assert worker.arena.payload(slot).tobytes() == device_block(kv, block)
    assert worker.arena.check(4, KEYS[1], fingerprint) == "block key does not match the " \
        "requested hash"


def test_flipped_host_block_is_not_scattered_and_is_reported_corrupt(kv):
    worker = make_worker(kv)
    store(worker, [0, 1, 2, 3], [0, 1, 2, 3], KEYS[:4])
    originals = [device_block(kv, b) for b in range(4)]
    zero_blocks(kv, [8, 9, 10, 11])
    empty = device_block(kv, 10)
    rule = faults.arm_spec("host.load:flip:times=1")[0]
    result, errors = load(worker, [8, 9, 10, 11], [0, 1, 2, 3], KEYS[:4])
    assert rule.fired == 1
    # The middle block (index 2) was flipped in G2: it stays off the device.
    assert worker.arena.payload(2).tobytes() != originals[2]
    assert device_block(kv, 10) == empty
    assert (result.failed_idx, result.corrupt_idx) == ([2], [2])
    assert errors == {10}
    for dst, want in zip([8, 9, 11], [originals[0], originals[1], originals[3]]):
        assert device_block(kv, dst) == want


def test_without_verify_host_the_flipped_block_is_scattered(kv):
    """The negative control of the test above: it fails if verification is not what stops
    the flipped block."""
    worker = make_worker(kv, verify_host=False)
    store(worker, [0, 1, 2, 3], [0, 1, 2, 3], KEYS[:4])
    original = device_block(kv, 2)
    faults.arm("host.load", "flip", times=1)
    result, errors = load(worker, [8, 9, 10, 11], [0, 1, 2, 3], KEYS[:4])
    assert not result.failed_idx and not errors
    assert device_block(kv, 10) == worker.arena.payload(2).tobytes() != original


def test_verify_host_is_a_bool_setting():
    assert load_config({}, env={}).verify_host is True
    assert load_config({"verify_host": "false"}, env={}).verify_host is False
    assert load_config(env={"KVTIER_VERIFY_HOST": "0"}).verify_host is False
    with pytest.raises(ConfigError, match="verify_host"):
        load_config({"verify_host": "sometimes"}, env={})


def test_blocks_staged_from_lower_tiers_are_not_verified_twice(kv):
    """``check`` False trusts a slot (verified on its way into G2); True verifies it."""
    worker = make_worker(kv)
    store(worker, [0, 1], [0, 1], KEYS[:2])
    worker.arena.payload(1)[5] ^= 0xFF
    zero_blocks(kv, [8, 9])
    fingerprint = worker.device.geometry.fingerprint(worker.model_id)
    bad = copy_host_to_device(worker.arena, [0, 1], worker.device, [8, 9], keys=KEYS[:2],
                              fingerprint=fingerprint, check=[True, False])
    assert bad == [] and device_block(kv, 9) == worker.arena.payload(1).tobytes()
    zero_blocks(kv, [10, 11])
    empty = device_block(kv, 11)
    bad = copy_host_to_device(worker.arena, [0, 1], worker.device, [10, 11], keys=KEYS[:2],
                              fingerprint=fingerprint)
    assert bad == [1] and device_block(kv, 11) == empty
    assert device_block(kv, 10) == worker.arena.payload(0).tobytes()


def test_wrong_key_or_unstamped_slot_fails_verification(kv):
    worker = make_worker(kv)
    store(worker, [0], [0], KEYS[:1])
    # Slot 0 holds KEYS[0], not KEYS[1]; slot 5 was never stamped.
    result, errors = load(worker, [8, 9], [0, 5], [KEYS[1], KEYS[2]])
    assert (result.failed_idx, result.corrupt_idx) == ([0, 1], [0, 1])
    assert errors == {8, 9}


def test_stamping_on_store_and_verifying_on_load_move_the_same_bytes(kv):
    """The checked copies move the same bytes as the plain ones, on every block."""
    worker = make_worker(kv)
    dev, arena = worker.device, worker.arena
    fingerprint = dev.geometry.fingerprint()
    copy_device_to_host(dev, [3, 4, 5], arena, [0, 1, 2], keys=KEYS[:3], fingerprint=fingerprint)
    bad = copy_host_to_device(arena, [0, 1, 2], dev, [13, 14, 15], keys=KEYS[:3],
                              fingerprint=fingerprint)
    assert bad == []
    for src, dst in zip([3, 4, 5], [13, 14, 15]):
        assert device_block(kv, dst) == device_block(kv, src)


@pytest.mark.parametrize("threads", [1, 3])
def test_verify_slots_names_exactly_the_bad_slots(kv, threads):
    """The host-side check the CUDA onboard runs before each chunk's DMA."""
    worker = make_worker(kv)
    store(worker, [0, 1, 2, 3, 4], [0, 1, 2, 3, 4], KEYS[:5])
    arena = worker.arena
    fingerprint = worker.device.geometry.fingerprint(worker.model_id)
    arena.payload(1)[-1] ^= 0x01        # payload flipped
    arena.header(3)[8] ^= 0x01          # geometry field of the header
    slots, keys = [0, 1, 2, 3, 4, 6], [*KEYS[:5], KEYS[6]]   # slot 6 was never stamped
    assert verify_slots(arena, slots, keys, fingerprint, threads=threads) == [1, 3, 5]
    assert verify_slots(arena, slots, keys, fingerprint, [True, False, True, True, True, False],
                        threads=threads) == [3]
    assert verify_slots(arena, [2], [KEYS[0]], fingerprint, threads=threads) == [0]


# -- the leader drops what failed ------------------------------------------------------------


def test_leader_counts_a_corrupt_host_block_and_drops_it_from_g2(kv):
    block_bytes = DeviceKV.from_tensors(kv, BS).geometry.block_bytes
    config = load_config({"host_cache_blocks": 8, "onboard_mode": "always",
                          "sync_load_max_ms": 1000}, env={})
    leader = Leader(config, block_tokens=BS, block_bytes=block_bytes, max_blocks_per_request=16)
    worker = Worker(config, leader.layout)
    worker.register(kv, BS)
    tokens = list(range(3, 3 + 4 * BS + 1))
    leader.match("a", tokens, 0)
    leader.progress("a", tokens, len(tokens), [0, 1, 2, 3, 4])
    worker.save(leader.take_plan())
    leader.on_report(worker.take_report())
    leader.finish("a")
    originals = [device_block(kv, b) for b in range(4)]

    assert leader.match("b", tokens, 0) == 4 * BS
    leader.begin_onboard("b", [8, 9, 10, 11, 12], 4 * BS)
    faults.arm("host.load", "flip", times=1)
    worker.start_loads(leader.take_plan())
    assert worker.take_load_errors() == {10}
    leader.on_report(worker.take_report())
    assert leader.metrics.value("kvtier_checksum_failures") == 1
    assert leader.metrics.value("kvtier_load_errors") == 1
    assert leader.metrics.value("kvtier_matched_blocks", tier="G2") == 3
    assert [device_block(kv, b) for b in (8, 9, 11)] == [originals[i] for i in (0, 1, 3)]
    # The bad block is gone from G2: a new request matches only the blocks before it.
    leader.finish("b")
    assert leader.match("c", tokens, 0) == 2 * BS
    assert leader.g2.num_active == 0
    leader.check_invariants()


# -- onboard.bypass: damage after verification ----------------------------------------------


@pytest.fixture(params=["vllm_cpu", "kv_first"])
def bypass_worker(request):
    kv = make_kv(request.param, seed=1)
    worker = make_worker(kv)
    # Blocks 0..4 of one prompt in slots 0..4, and another prompt's block 6 in slot 5.
    store(worker, [0, 1, 2, 3, 4, 6], [0, 1, 2, 3, 4, 5], KEYS[:6])
    sources = {b: device_block(kv, b) for b in range(7)}
    return kv, worker, sources


def test_bypass_zero_zeroes_the_middle_block_on_the_device(bypass_worker):
    kv, worker, src = bypass_worker
    faults.arm_spec("onboard.bypass:zero:times=1")
    result, errors = load(worker, [8, 9, 10, 11], [0, 1, 2, 3], KEYS[:4])
    assert not result.failed_idx and not errors, "verification cannot see it"
    assert device_block(kv, 10) == bytes(len(src[2]))
    assert [device_block(kv, b) for b in (8, 9, 11)] == [src[0], src[1], src[3]]


def test_bypass_swap_puts_another_prompts_block_in_the_middle(bypass_worker):
    kv, worker, src = bypass_worker
    faults.arm("onboard.bypass", "swap", times=1)
    load(worker, [8, 9, 10, 11], [0, 1, 2, 3], KEYS[:4])
    # Slot 4 (block 4) is the first stamped slot outside the load.
    assert device_block(kv, 10) == src[4] != src[2]
    assert [device_block(kv, b) for b in (8, 9, 11)] == [src[0], src[1], src[3]]


def test_bypass_swap_without_another_block_uses_the_first_block_of_the_op(bypass_worker):
    kv, worker, src = bypass_worker
    faults.arm("onboard.bypass", "swap")
    load(worker, [8, 9, 10, 11, 12, 13], [0, 1, 2, 3, 4, 5], KEYS[:6])
    assert device_block(kv, 11) == src[0]


def test_bypass_shift_lands_every_block_one_position_off(bypass_worker):
    kv, worker, src = bypass_worker
    faults.arm("onboard.bypass", "shift")
    load(worker, [8, 9, 10, 11], [0, 1, 2, 3], KEYS[:4])
    assert [device_block(kv, b) for b in (8, 9, 10, 11)] == [src[1], src[2], src[3], src[3]]


def test_bypass_fires_per_load_op_with_the_rule_options(bypass_worker):
    kv, worker, src = bypass_worker
    rule = faults.arm("onboard.bypass", "zero", after=1, times=1)
    load(worker, [8, 9], [0, 1], KEYS[:2])           # skipped (after=1)
    assert device_block(kv, 9) == src[1]
    load(worker, [10, 11], [0, 1], KEYS[:2])         # fires
    assert device_block(kv, 11) == bytes(len(src[1]))
    load(worker, [12, 13], [0, 1], KEYS[:2])         # times=1: done
    assert device_block(kv, 13) == src[1]
    assert rule.fired == 1 and rule.seen == 3


def test_new_fault_points_refuse_unknown_kinds():
    with pytest.raises(ConfigError, match="host.load"):
        faults.arm_spec("host.load:zero")
    with pytest.raises(ConfigError, match="onboard.bypass"):
        faults.arm("onboard.bypass", "flip")


@pytest.mark.parametrize("where", ["first", "run_edge", "last"])
def test_a_flip_anywhere_in_a_many_run_payload_fails_only_its_block(where):
    """vLLM-sized layers (64 KiB each, a 512 KiB payload): the checked copies work in runs of
    the slot, so a flipped byte in any run (the first byte, the first byte of the second run,
    the last byte) must fail its block, and only it; the other blocks land intact."""
    gen = torch.Generator().manual_seed(1)
    kv = {f"model.layers.{i}.self_attn.attn":
          torch.randint(-2**15, 2**15, (8, 8, 16, 256), dtype=torch.int16, generator=gen)
          .view(torch.bfloat16) for i in range(8)}
    dev = DeviceKV.from_tensors(kv, 16)
    arena = HostArena(4, dev.geometry, pin=False)
    try:
        fingerprint = dev.geometry.fingerprint()
        keys = KEYS[:4]
        copy_device_to_host(dev, [0, 1, 2, 3], arena, [0, 1, 2, 3], keys=keys,
                            fingerprint=fingerprint)
        for slot, key in enumerate(keys):   # the digest of the whole payload, as stamped
            assert arena.check(slot, key, fingerprint) is None
        payload = arena.payload(2)
        assert payload.size == 8 * 64 * 1024
        position = {"first": 0, "run_edge": 256 * 1024, "last": payload.size - 1}[where]
        payload[position] ^= 0x01
        bad = copy_host_to_device(arena, [0, 1, 2, 3], dev, [4, 5, 6, 7], keys=keys,
                                  fingerprint=fingerprint)
        assert bad == [2]
        for src, dst in ((0, 4), (1, 5), (3, 7)):
            assert device_block(kv, dst, 8) == device_block(kv, src, 8)
        assert set(device_block(kv, 6, 8)) == {0}  # zeroed, never half the block
    finally:
        arena.close()
