"""Publish KV events over ZMQ in vLLM's KV-event wire format, so KV-aware routers (Dynamo,
llm-d) that read vLLM's events read kvtier's too.

Wire format (vLLM ``vllm/distributed/kv_events.py``): a PUB multipart message
``[topic, seq (8-byte big-endian), payload]`` where ``payload`` is a msgpack
``KVEventBatch`` — an array ``[ts, events, data_parallel_rank]`` whose events are maps tagged
by ``"type"`` (``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared``). The tier becomes the
``medium`` field (``Tier.medium``). The structs below mirror that schema; vLLM is not imported.

The one module of ``events`` that does I/O; ``zmq`` is imported when a publisher is made.
A publisher is used from one thread (ZMQ sockets are not thread-safe).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from kvtier.errors import ConfigError
from kvtier.events.types import AllBlocksCleared, BlockRemoved, BlockStored, KvEvent

if TYPE_CHECKING:
    from typing import Self

__all__ = ["ZmqEventPublisher", "encode_batch"]

_WireHash = int | bytes


class _WireEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class _WireEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class _WireBlockStored(_WireEvent, tag="BlockStored"):
    # Fields without defaults are always sent: vLLM's decoder requires them.
    block_hashes: list[_WireHash]
    parent_block_hash: _WireHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class _WireBlockRemoved(_WireEvent, tag="BlockRemoved"):
    block_hashes: list[_WireHash]
    medium: str | None


class _WireAllBlocksCleared(_WireEvent, tag="AllBlocksCleared"):
    pass


def _to_wire(event: KvEvent) -> _WireEvent:
    if isinstance(event, BlockStored):
        return _WireBlockStored(
            block_hashes=event.block_hashes, parent_block_hash=event.parent_block_hash,
            token_ids=event.token_ids if event.token_ids is not None else [],
            block_size=event.block_size, lora_id=None, medium=event.tier.medium,
            lora_name=event.lora_name)
    if isinstance(event, BlockRemoved):
        return _WireBlockRemoved(block_hashes=event.block_hashes, medium=event.tier.medium)
    if isinstance(event, AllBlocksCleared):
        return _WireAllBlocksCleared()
    raise TypeError(f"not a kvtier KV event: {event!r}")


_encoder = msgspec.msgpack.Encoder()


def encode_batch(events: Sequence[KvEvent], data_parallel_rank: int | None = None,
                 ts: float | None = None) -> bytes:
    """The msgpack payload of one vLLM ``KVEventBatch`` holding ``events``."""
    batch = _WireEventBatch(ts=time.time() if ts is None else ts,
                            events=[_to_wire(event) for event in events],
                            data_parallel_rank=data_parallel_rank)
    return _encoder.encode(batch)


def _offset_endpoint(endpoint: str, rank: int | None) -> str:
    """vLLM's rule: each data-parallel rank publishes on its own endpoint."""
    if not rank:
        return endpoint
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{rank}"
    if endpoint.startswith("tcp://") and ":" in endpoint[6:]:
        base, _, port = endpoint.rpartition(":")
        if port.isdigit() and int(port) != 0:
            return f"{base}:{int(port) + rank}"
    return endpoint


class ZmqEventPublisher:
    """A ZMQ PUB socket sending batches of kvtier events in vLLM's wire format.

    ``endpoint`` is bound when it is a wildcard (``tcp://*:5557``) or ipc/inproc, and connected
    to otherwise (vLLM's rule); ``bind`` forces either. With ``data_parallel_rank`` set, the
    rank is stamped on every batch and, as vLLM does, offsets a tcp port (or suffixes an inproc
    name). Sends never block: when the high-water mark is reached ZMQ drops the batch
    (counted in ``num_dropped``).
    """

    def __init__(self, endpoint: str, topic: str = "kv-events",
                 data_parallel_rank: int | None = None, *, bind: bool | None = None,
                 hwm: int = 100_000) -> None:
        import zmq  # the only I/O dependency of the events package

        self._zmq = zmq
        self.topic = topic
        self.data_parallel_rank = data_parallel_rank
        self.endpoint = _offset_endpoint(endpoint, data_parallel_rank)
        if bind is None:
            bind = ("*" in self.endpoint or "::" in self.endpoint
                    or self.endpoint.startswith(("ipc://", "inproc://")))
        self._topic_bytes = topic.encode("utf-8")
        self._next_seq = 0
        self.num_dropped = 0
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            if bind:
                self._socket.bind(self.endpoint)
            else:
                self._socket.connect(self.endpoint)
        except zmq.ZMQError as exc:
            self.close()
            verb = "bind" if bind else "connect"
            raise ConfigError(f"events_endpoint {self.endpoint!r}: cannot {verb}: {exc}") from exc
        if bind and self.endpoint.endswith(":0"):
            self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def publish(self, events: Sequence[KvEvent]) -> int | None:
        """Send ``events`` as one batch; returns its sequence number (None when empty)."""
        if self._socket is None:
            raise ConfigError("ZmqEventPublisher.publish after close()")
        if not events:
            return None
        seq = self._next_seq
        self._next_seq += 1
        payload = encode_batch(events, self.data_parallel_rank)
        try:
            self._socket.send_multipart((self._topic_bytes, seq.to_bytes(8, "big"), payload),
                                        flags=self._zmq.NOBLOCK)
        except self._zmq.Again:
            self.num_dropped += 1
        return seq

    def close(self) -> None:
        if getattr(self, "_socket", None) is not None:
            self._socket.close(linger=0)
            self._socket = None
        if getattr(self, "_context", None) is not None:
            self._context.term()
            self._context = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
