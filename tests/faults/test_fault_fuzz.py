"""Hostile input: every bad input gives a clear KvtierError (or a counted miss for bad block
bytes), never another exception, a hang or wrong data.

Fuzzed with Hypothesis: the config loader (extra dict, environment, config files), the step
plan a worker receives, the disk tier's journal (index recovery), the stored block header
decoder, and the remote tier's read path over arbitrary stored values. Inputs that expose bugs
this suite found are pinned as regression tests at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import tempfile
from typing import ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.config import _FIELDS, KVBM_ALIASES, KvtierConfig, load_config
from kvtier.errors import BlockFormatError, ConfigError, KvtierError, MetadataError
from kvtier.protocol import NO_SLOT, CopyOps, LoadOp, StepPlan, TierLayout
from kvtier.storage import block_format
from kvtier.storage.disk import (
    _OP_ADD,
    _OP_DEL,
    JOURNAL_NAME,
    RECORD_BYTES,
    DiskStorage,
    _pack_record,
    _pack_super,
    _parse_journal,
)
from kvtier.storage.remote.base import (
    RemoteBackend,
    make_namespace,
    register_backend,
    remote_key,
)

FIELD_NAMES = sorted(_FIELDS)
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW_FUZZ = settings(max_examples=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])

# -- config loader ----------------------------------------------------------------------------------

any_value = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-5, 70000),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=24),
    st.sampled_from(["1", "0", "true", "off", "lru", "always", "xxh3", "auto", "-1", "2.5",
                     "redis://:pw@h:1/0", "/tmp/kvtier-x", "1e3", " 7 "]),
    st.binary(max_size=8), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
any_key = st.one_of(st.sampled_from(FIELD_NAMES + ["kv_connector", "kv_role"]),
                    st.text(max_size=12), st.integers())
env_name = st.one_of(st.sampled_from([f"KVTIER_{k.upper()}" for k in FIELD_NAMES]
                                     + list(KVBM_ALIASES) + ["PATH", "KVTIER_", "KVTIER_NOPE"]),
                     st.text(max_size=12).map(lambda s: "KVTIER_" + s))


def load_or_config_error(*args, **kwargs) -> KvtierConfig | None:
    try:
        config = load_config(*args, **kwargs)
    except ConfigError as exc:
        assert str(exc), "a ConfigError must say what is wrong"
        return None
    assert isinstance(config, KvtierConfig)
    return config


@FUZZ
@given(extra=st.dictionaries(any_key, any_value, max_size=6),
       env=st.dictionaries(env_name.filter(lambda n: n != "KVTIER_CONFIG"),
                           st.text(max_size=24), max_size=4))
def test_config_from_any_dict_and_env_is_valid_or_a_config_error(extra, env):
    load_or_config_error(extra, env=env)


settings_dict = st.dictionaries(st.sampled_from(FIELD_NAMES + ["other"]), any_value.filter(
    lambda v: not isinstance(v, bytes) and v is not None), max_size=4)


@SLOW_FUZZ
@given(suffix=st.sampled_from([".toml", ".yaml", ".yml", ".json", ""]),
       content=st.one_of(st.text(max_size=80), settings_dict.map(repr),
                         settings_dict.map(lambda d: "\n".join(f"{k}: {v!r}"
                                                               for k, v in d.items())),
                         settings_dict.map(lambda d: "\n".join(f"{k} = {v!r}"
                                                               for k, v in d.items())),
                         settings_dict.map(lambda d: "[kvtier]\n" + "\n".join(
                             f"{k} = {v!r}" for k, v in d.items())),
                         any_value.map(lambda v: f"kvtier: {v!r}"),
                         any_value.map(lambda v: f"kvtier = {v!r}")))
def test_any_config_file_is_valid_or_a_config_error(suffix, content):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kvtier" + suffix)
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
        load_or_config_error({}, env={"KVTIER_CONFIG": path})
        load_or_config_error({}, env={}, config_file=path)


# -- the step plan ------------------------------------------------------------------------------------

ids = st.lists(st.integers(-3, 40), max_size=4)
keys = st.lists(st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=32)), max_size=4)
load_ops = st.builds(LoadOp, req_id=st.text(max_size=4), device_block_ids=ids, g2_slots=ids,
                     g3_slots=ids, keys=keys)
copy_ops = st.builds(CopyOps, src=ids, dst=ids, keys=keys, op_ids=ids)
plans = st.builds(StepPlan, loads=st.lists(load_ops, max_size=3), stores=copy_ops,
                  disk_writes=copy_ops, disk_discards=st.lists(st.integers(-2, 40), max_size=3))


def _sized(n: int):
    ids_n = st.lists(st.integers(-3, 40), min_size=n, max_size=n)
    keys_n = st.lists(st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=32)), min_size=n,
                      max_size=n)
    return ids_n, keys_n


# Shaped right (list lengths agree), any ids: what a buggy or hostile leader could send.
shaped_load_ops = st.integers(0, 4).flatmap(lambda n: st.builds(
    LoadOp, req_id=st.text(max_size=4), device_block_ids=_sized(n)[0], g2_slots=_sized(n)[0],
    g3_slots=_sized(n)[0], keys=_sized(n)[1]))
shaped_copy_ops = st.integers(0, 4).flatmap(lambda n: st.builds(
    CopyOps, src=_sized(n)[0], dst=_sized(n)[0], keys=_sized(n)[1], op_ids=_sized(n)[0]))


def lengths_agree(plan: StepPlan) -> bool:
    return (all(len(op.device_block_ids) == len(op.g2_slots) == len(op.g3_slots)
                == len(op.keys) for op in plan.loads)
            and all(len(c.src) == len(c.dst) == len(c.keys) == len(c.op_ids)
                    for c in (plan.stores, plan.disk_writes)))


@FUZZ
@given(plan=plans)
def test_plan_validation_raises_metadata_error_exactly_for_mismatched_lists(plan):
    if lengths_agree(plan):
        plan.validate()
    else:
        with pytest.raises(MetadataError):
            plan.validate()


def make_worker(directory: str):
    from kvtier.layout import DeviceKV
    from kvtier.worker import Worker

    kv = {f"model.layers.{i}.self_attn.attn": torch.zeros(16, 2, 16, 64, dtype=torch.bfloat16)
          for i in range(2)}
    block_bytes = DeviceKV.from_tensors(kv, 16).geometry.block_bytes
    config = load_config({"host_cache_blocks": 8, "disk_cache_blocks": 8,
                          "disk_dir": directory}, env={})
    w = Worker(config, TierLayout(8, 8, block_bytes))
    w.register(kv, 16)
    return w


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = make_worker(str(tmp_path_factory.mktemp("w")))
    yield w
    w.close()


def settle(worker) -> tuple[set[int], set[str]]:
    worker.drain(10)
    errors, finished = worker.take_load_errors(), worker.take_finished_loads()
    worker.take_report()
    return errors, finished


@SLOW_FUZZ
@given(loads=st.lists(shaped_load_ops, max_size=3, unique_by=lambda op: op.req_id))
def test_worker_loads_with_any_ids_fail_cleanly(worker, loads):
    """Loads whose lists agree but whose ids are anything: the worker raises a KvtierError or
    reports blocks failed. A device block not reported failed was copied from an in-range
    arena slot (this worker's disk holds nothing, so no disk read may succeed)."""
    plan = StepPlan(loads=loads)
    try:
        worker.start_loads(plan)
    except KvtierError:
        pass
    errors, finished = settle(worker)
    for op in plan.loads:
        if op.req_id not in finished:
            continue
        for dev, g2, g3 in zip(op.device_block_ids, op.g2_slots, op.g3_slots):
            if dev not in errors:
                assert 0 <= g2 < 8 and g3 == NO_SLOT, (op, errors)


@SLOW_FUZZ
@given(plan=st.builds(StepPlan, stores=shaped_copy_ops, disk_writes=shaped_copy_ops,
                     disk_discards=st.lists(st.integers(-2, 40), max_size=3)))
def test_worker_saves_with_any_ids_fail_cleanly(tmp_path_factory, plan):
    """Stores, disk writes and discards with any ids: a KvtierError or per-block failures,
    never another exception, and the disk index names only blocks that read back intact."""
    w = make_worker(str(tmp_path_factory.mktemp("s")))
    try:
        try:
            w.save(plan)
        except KvtierError:
            pass
        settle(w)
        for slot, key in w.disk.recover():
            assert w.disk.read(w.arena, [(slot, 7, key)]) == [True]
    finally:
        w.close()


# -- disk journal recovery -----------------------------------------------------------------------------

FP = 0xD15C_0000_0000_0001
journal_ops = st.lists(st.tuples(st.sampled_from([_OP_ADD, _OP_DEL]), st.integers(0, 20),
                                 st.sampled_from([FP, FP + 1]),
                                 st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=32))),
                       max_size=12)


def replay(ops) -> dict:
    entries = {}
    for op, slot, fp, key in ops:
        if op == _OP_ADD:
            entries[slot] = (fp, key)
        else:
            entries.pop(slot, None)
    return entries


def journal_image(ops, slot_bytes=4096, num_slots=16) -> bytes:
    return _pack_super(slot_bytes, num_slots) + b"".join(
        _pack_record(op, slot, fp, key if op == _OP_ADD else None) for op, slot, fp, key in ops)


def normal(entries: dict) -> dict:
    return {slot: (fp, block_format.key_bytes(key)) for slot, (fp, key) in entries.items()}


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_journal_bytes_never_crash_the_parser(data):
    state = _parse_journal(data)
    if state is not None:
        assert RECORD_BYTES <= state.valid_bytes <= len(data)


@FUZZ
@given(ops=journal_ops, damage=st.sampled_from(["truncate", "flip", "append"]),
       where=st.integers(0, 10_000), byte=st.integers(1, 255), garbage=st.binary(max_size=130))
def test_damaged_journal_recovers_exactly_the_intact_records_before_the_damage(
        ops, damage, where, byte, garbage):
    image = bytearray(journal_image(ops))
    if damage == "truncate":
        cut = where % (len(image) + 1)
        image = image[:cut]
        intact = None if cut < RECORD_BYTES else (cut - RECORD_BYTES) // RECORD_BYTES
    elif damage == "flip":
        pos = where % len(image)
        image[pos] ^= byte
        intact = None if pos < RECORD_BYTES else (pos - RECORD_BYTES) // RECORD_BYTES
    else:
        image += garbage
        intact = len(ops)
    state = _parse_journal(bytes(image))
    if intact is None:
        assert state is None
        return
    assert normal(state.entries) == normal(replay(ops[:intact]))


@SLOW_FUZZ
@given(ops=journal_ops, flip=st.one_of(st.none(), st.integers(0, 10_000)),
       num_slots=st.integers(1, 16), slot_bytes=st.sampled_from([4096, 8192]),
       noise=st.binary(max_size=200))
def test_disk_tier_opens_any_journal_and_recovers_only_valid_entries(ops, flip, num_slots,
                                                                     slot_bytes, noise):
    image = bytearray(journal_image(ops, slot_bytes=slot_bytes))
    if flip is not None:
        image[flip % len(image)] ^= 0xA5
    image += noise
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, JOURNAL_NAME), "wb") as f:
            f.write(image)
        with DiskStorage(d, num_slots, 4096, FP) as disk:
            recovered = dict(disk.recover())
        parsed = _parse_journal(bytes(image))
        allowed = {} if parsed is None or parsed.slot_bytes != 4096 else {
            slot: key for slot, (fp, key) in parsed.entries.items()
            if fp == FP and slot < num_slots}
        assert recovered == allowed
        # Reopening the compacted journal gives the same index.
        with DiskStorage(d, num_slots, 4096, FP) as disk:
            assert dict(disk.recover()) == recovered


# -- stored block header -----------------------------------------------------------------------------

block_keys = st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=32))


def same_but_flags(header: bytes, expected: bytes) -> bool:
    return header[:6] == expected[:6] and header[8:64] == expected[8:64]


@FUZZ
@given(header=st.binary(max_size=80), payload=st.binary(max_size=64), key=block_keys,
       geometry=st.integers(0, 2**64 - 1))
def test_random_headers_are_refused_unless_exact(header, payload, key, geometry):
    expected = block_format.pack_header(key, geometry, payload)
    try:
        block_format.verify(header, payload, key, geometry)
    except BlockFormatError:
        assert not (len(header) >= 64 and same_but_flags(header, expected))
        return
    assert same_but_flags(header, expected)


@FUZZ
@given(payload=st.binary(min_size=1, max_size=64), key=block_keys,
       geometry=st.integers(0, 2**64 - 1), pos=st.integers(0, 10_000),
       byte=st.integers(1, 255), other_key=block_keys)
def test_any_changed_byte_or_key_is_refused(payload, key, geometry, pos, byte, other_key):
    block = bytearray(block_format.pack_header(key, geometry, payload) + payload)
    verified = [i for i in range(len(block)) if i not in (6, 7)]  # flags are reserved
    i = verified[pos % len(verified)]
    block[i] ^= byte
    with pytest.raises(BlockFormatError):
        block_format.verify(block[:64], block[64:], key, geometry)
    good = block_format.pack_header(key, geometry, payload)
    if block_format.key_bytes(other_key) != block_format.key_bytes(key):
        with pytest.raises(BlockFormatError):
            block_format.verify(good, payload, other_key, geometry)


# -- the remote tier's read path --------------------------------------------------------------------


class MemoryStore(RemoteBackend):
    """An in-process store (``fuzzmem://``): values are whatever a test puts in ``data``."""

    scheme = "fuzzmem"
    data: ClassVar[dict[str, bytes]] = {}

    def _store(self, names, views):
        for name, view in zip(names, views):
            self.data.setdefault(name, bytes(view))
        return [0] * len(names)

    def _fetch(self, names, views):
        return [self.data.get(name) for name in names]

    def _exists(self, names):
        return [int(name in self.data) for name in names]

    def _remove(self, names):
        for name in names:
            self.data.pop(name, None)

    def _probe(self):
        return True

    def _close(self):
        pass


register_backend(MemoryStore)
RFP = 0x0123_4567_89AB_CDEF
PAYLOAD = 192


@FUZZ
@given(key=block_keys, stored=st.one_of(
    st.binary(max_size=PAYLOAD + 80),
    st.tuples(block_keys, st.integers(0, 2**64 - 1), st.binary(min_size=PAYLOAD,
                                                              max_size=PAYLOAD)).map(
        lambda t: block_format.pack_header(t[0], t[1], t[2]) + t[2]),
    st.tuples(st.binary(min_size=PAYLOAD, max_size=PAYLOAD), st.integers(0, 255),
              st.integers(1, 255)).map(lambda t: (t[0], t[1], t[2]))))
def test_remote_reads_serve_only_exact_blocks(key, stored):
    ns = make_namespace("fuzz-model", RFP)
    store = MemoryStore("fuzzmem://x", namespace=ns, timeout_s=5.0)
    try:
        if isinstance(stored, tuple):  # a valid block for this key with one byte changed
            payload, pos, byte = stored
            value = bytearray(block_format.pack_header(key, RFP, payload) + payload)
            verified = [i for i in range(len(value)) if i not in (6, 7)]
            value[verified[pos % len(verified)]] ^= byte
            stored = bytes(value)
        name = remote_key(ns, key)
        MemoryStore.data = {name: stored}
        buf = bytearray(64 + PAYLOAD)
        ok = store.batch_get_into([key], [memoryview(buf)])
        exact = (len(stored) == len(buf) and same_but_flags(
            stored, block_format.pack_header(key, RFP, stored[64:])))
        assert ok == [exact]
        if exact:
            assert buf[64:] == stored[64:]
        stats = store.snapshot_stats()
        assert stats["hits"] + stats["misses"] == 1
        if not exact:
            assert name not in MemoryStore.data, "a bad value must be dropped from the store"
    finally:
        store.close()


# -- bugs found by this suite (strict xfails: each turns into a failure once fixed) --------------


@pytest.mark.parametrize("value", [math.inf, math.nan, "inf", "nan", 1e300])
def test_non_finite_or_overflowing_tier_sizes_are_config_errors(value):
    """Found by this suite: inf/nan loaded, and crashed later with OverflowError (now fixed)."""
    with pytest.raises(ConfigError):
        load_config({"disk_cache_gb": value, "disk_dir": "/tmp/x"}, env={})


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.mark.parametrize("case", ["yaml_scalar_table", "toml_scalar_table", "not_utf8",
                                  "nul_in_path"])
def test_bad_config_files_are_config_errors(tmp_path, case):
    """Found by this suite: these escaped as AttributeError, UnicodeDecodeError and ValueError
    (now fixed)."""
    path = {
        "yaml_scalar_table": lambda: _write(str(tmp_path / "c.yaml"), b"kvtier: 5\n"),
        "toml_scalar_table": lambda: _write(str(tmp_path / "c.toml"), b"kvtier = 5\n"),
        "not_utf8": lambda: _write(str(tmp_path / "c.yaml"), b"\xff\xfe host_cache_gb: 1\n"),
        "nul_in_path": lambda: str(tmp_path / "c\x00.yaml"),
    }[case]()
    with pytest.raises(ConfigError):
        load_config({}, env={"KVTIER_CONFIG": path})


@pytest.mark.parametrize("op", [
    LoadOp("r", [1, 2], [0], [NO_SLOT], [11]),   # device block 2 would go unreported
    LoadOp("r", [1], [0], [0, 1], [11]),         # once an IndexError
])
def test_worker_rejects_malformed_plans_whole(worker, op):
    """A plan whose lists disagree is refused with MetadataError before anything moves
    (found by this suite; fixed in Worker.start_loads)."""
    with pytest.raises(MetadataError):
        worker.start_loads(StepPlan(loads=[dataclasses.replace(op)]))
    errors, finished = settle(worker)
    assert not errors and not finished


def test_struct_sizes_match_the_documented_format():
    # Guards the fuzzers above: they assume 64-byte records and headers.
    assert RECORD_BYTES == 64 == block_format.HEADER_BYTES
    assert struct.calcsize("<4sHHQ32sQQ") == 64
