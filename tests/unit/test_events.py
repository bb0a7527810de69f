"""kvtier.events: event buffer, and the ZMQ publisher decoded by vLLM's own classes."""

from __future__ import annotations

import time

import msgspec
import pytest

from kvtier.errors import ConfigError
from kvtier.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBuffer
from kvtier.events.publisher import ZmqEventPublisher, _offset_endpoint, encode_batch
from kvtier.pools import BlockPool
from kvtier.tiers import Tier
from need import need_module

zmq = need_module("zmq")


def test_event_buffer_hands_over_batches_in_order():
    buffer = EventBuffer()
    assert buffer.take_events() == []
    first = BlockStored([1, 2], None, 16, Tier.G2)
    second = BlockRemoved([1], Tier.G2)
    buffer.add(first)
    buffer.add(second)
    assert len(buffer) == 2
    assert buffer.take_events() == [first, second]
    assert buffer.take_events() == [] and len(buffer) == 0
    buffer.add(AllBlocksCleared())
    assert buffer.take_events() == [AllBlocksCleared(None)]


def test_pool_events_describe_its_lifecycle():
    buffer = EventBuffer()
    pool = BlockPool(Tier.G3, 2, events=buffer, block_size=4)
    ids = pool.allocate(2)
    pool.complete(ids)
    pool.register(ids, [7, 8], parent=6, token_ids=list(range(8)))
    pool.release(ids)
    pool.allocate(1)
    pool.clear()
    assert buffer.take_events() == [
        BlockStored([7, 8], 6, 4, Tier.G3, list(range(8)), None),
        BlockRemoved([7], Tier.G3),
        AllBlocksCleared(Tier.G3),
    ]


@pytest.fixture(scope="module")
def vllm_kv_events():
    return need_module("vllm.distributed.kv_events")


def _sample_events():
    return [
        BlockStored([1, 2**64 - 1], None, 16, Tier.G2, list(range(32)), "adapter"),
        BlockStored([b"\x01" * 32], b"\x02" * 32, 16, Tier.G3),
        BlockRemoved([5, 6], Tier.G4),
        AllBlocksCleared(Tier.G2),
    ]


def _check_decoded(batch, vllm_kv_events, rank):
    assert isinstance(batch, vllm_kv_events.KVEventBatch)
    assert batch.data_parallel_rank == rank
    assert abs(batch.ts - time.time()) < 60
    stored, stored_bytes, removed, cleared = batch.events
    assert isinstance(stored, vllm_kv_events.BlockStored)
    assert stored.block_hashes == [1, 2**64 - 1]
    assert stored.parent_block_hash is None
    assert stored.token_ids == list(range(32))
    assert stored.block_size == 16
    assert stored.medium == "CPU" and stored.lora_name == "adapter" and stored.lora_id is None
    assert stored_bytes.block_hashes == [b"\x01" * 32]
    assert stored_bytes.parent_block_hash == b"\x02" * 32
    assert stored_bytes.token_ids == [] and stored_bytes.medium == Tier.G3.medium
    assert isinstance(removed, vllm_kv_events.BlockRemoved)
    assert removed.block_hashes == [5, 6] and removed.medium == Tier.G4.medium
    assert isinstance(cleared, vllm_kv_events.AllBlocksCleared)


def test_encoded_batch_decodes_with_vllm_classes(vllm_kv_events):
    payload = encode_batch(_sample_events(), data_parallel_rank=None)
    batch = msgspec.msgpack.Decoder(vllm_kv_events.KVEventBatch).decode(payload)
    _check_decoded(batch, vllm_kv_events, None)


def _receive(sub, publisher, events, attempts=50):
    """Publish until the subscriber sees a message (PUB/SUB drops until connected)."""
    for _ in range(attempts):
        publisher.publish(events)
        if sub.poll(100):
            return sub.recv_multipart()
    raise AssertionError("no message received")


def test_publisher_connects_to_a_subscriber_and_speaks_vllm_wire_format(vllm_kv_events):
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    publisher = ZmqEventPublisher(f"tcp://127.0.0.1:{port}", data_parallel_rank=0)
    try:
        topic, seq, payload = _receive(sub, publisher, _sample_events())
        assert topic == b"kv-events"
        assert len(seq) == 8
        first_seq = int.from_bytes(seq, "big")
        batch = msgspec.msgpack.Decoder(vllm_kv_events.KVEventBatch).decode(payload)
        _check_decoded(batch, vllm_kv_events, 0)
        # Sequence numbers count batches; once connected, none is lost.
        last_seq = publisher.publish([BlockRemoved([9], Tier.G2)])
        assert last_seq > first_seq
        received = []
        while not received or received[-1][0] != last_seq:
            _, seq, payload = sub.recv_multipart()
            received.append((int.from_bytes(seq, "big"), payload))
        assert [s for s, _ in received] == list(range(first_seq + 1, last_seq + 1))
        later = msgspec.msgpack.Decoder(vllm_kv_events.KVEventBatch).decode(received[-1][1])
        assert later.events[0].block_hashes == [9]
        assert publisher.publish([]) is None
    finally:
        publisher.close()
        sub.close()
        ctx.term()
    with pytest.raises(ConfigError, match="after close"):
        publisher.publish(_sample_events())
    publisher.close()  # idempotent


def test_publisher_binds_when_asked_and_reports_the_port(vllm_kv_events):
    with ZmqEventPublisher("tcp://127.0.0.1:0", topic="t", bind=True) as publisher:
        assert not publisher.endpoint.endswith(":0")
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(publisher.endpoint)
        try:
            topic, _, payload = _receive(sub, publisher, [AllBlocksCleared()])
            assert topic == b"t"
            batch = msgspec.msgpack.Decoder(vllm_kv_events.KVEventBatch).decode(payload)
            assert isinstance(batch.events[0], vllm_kv_events.AllBlocksCleared)
        finally:
            sub.close()
            ctx.term()


def test_publisher_rejects_a_bad_endpoint():
    with pytest.raises(ConfigError, match="events_endpoint"):
        ZmqEventPublisher("not-a-transport://x")


def test_endpoint_offset_per_data_parallel_rank():
    assert _offset_endpoint("tcp://*:5557", None) == "tcp://*:5557"
    assert _offset_endpoint("tcp://*:5557", 0) == "tcp://*:5557"
    assert _offset_endpoint("tcp://*:5557", 2) == "tcp://*:5559"
    assert _offset_endpoint("tcp://127.0.0.1:0", 2) == "tcp://127.0.0.1:0"
    assert _offset_endpoint("inproc://events", 1) == "inproc://events_dp1"
    assert _offset_endpoint("ipc:///tmp/ev", 1) == "ipc:///tmp/ev"


def test_encode_rejects_foreign_objects():
    with pytest.raises(TypeError):
        encode_batch([object()])
