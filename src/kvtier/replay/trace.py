"""Request traces in the Mooncake JSONL form, loaded and validated line by line.

One JSON object per line::

    {"timestamp": <ms>, "input_length": <tokens>, "output_length": <tokens>, "hash_ids": [...]}

``hash_ids`` are chained prefix-block ids with ``block_tokens`` tokens per block (512 in the
Mooncake traces): id ``k`` stands for block ``k`` *and every block before it*, so two requests
share ``k`` blocks of KV prefix iff their first ``k`` ids are equal. The last block may be
partial; ``len(hash_ids) == ceil(input_length / block_tokens)``. An engine caches full blocks
only (vLLM hashes a block once it is full), so a replay caches and matches a request's
:meth:`TraceRequest.cacheable_ids`: a partial last block is recomputed every time (its id does
not come back: the next turn extends that block, and its id with it).

Validation stops at the first bad line with a :class:`~kvtier.errors.TraceError` that names the
line number and what is wrong, because a replay over a silently repaired trace would report hit
ratios for a workload nobody sent.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence

from kvtier.errors import TraceError

MOONCAKE_BLOCK_TOKENS = 512
_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


@dataclasses.dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request: arrival time, sizes and its chained prefix-block ids."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def to_json(self) -> str:
        ts = int(self.timestamp_ms) if float(self.timestamp_ms).is_integer() else self.timestamp_ms
        return json.dumps({"timestamp": ts, "input_length": self.input_length,
                           "output_length": self.output_length,
                           "hash_ids": list(self.hash_ids)})

    def cacheable_ids(self, block_tokens: int) -> tuple[int, ...]:
        """The ids of the prompt's full blocks, the only ones an engine caches (module doc)."""
        return self.hash_ids[:self.input_length // block_tokens]


@dataclasses.dataclass(frozen=True, slots=True)
class Trace:
    """A validated, ordered list of requests and the tokens each hash block covers."""

    requests: tuple[TraceRequest, ...]
    block_tokens: int
    source: str = ""

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def num_block_accesses(self) -> int:
        return sum(len(r.hash_ids) for r in self.requests)

    @property
    def num_unique_blocks(self) -> int:
        return len({h for r in self.requests for h in r.hash_ids})

    @property
    def num_cacheable_blocks(self) -> int:
        """The working set of a replay: distinct full blocks (``cacheable_ids``)."""
        block_tokens = self.block_tokens
        return len({h for r in self.requests for h in r.cacheable_ids(block_tokens)})

    @property
    def longest_cacheable(self) -> int:
        """The most full blocks one request has: a cache smaller than that is no test."""
        block_tokens = self.block_tokens
        return max((len(r.cacheable_ids(block_tokens)) for r in self.requests), default=0)

    def head(self, num_requests: int) -> Trace:
        """The first ``num_requests`` requests (a prefix is still a valid trace)."""
        return dataclasses.replace(self, requests=self.requests[:num_requests])

    def write_jsonl(self, path: str | os.PathLike[str]) -> None:
        try:
            with open(path, "w", encoding="utf-8") as out:
                for request in self.requests:
                    out.write(request.to_json())
                    out.write("\n")
        except OSError as exc:
            raise TraceError(f"cannot write trace {path}: {exc.strerror or exc}") from exc


def load_trace(path: str | os.PathLike[str], *, block_tokens: int = MOONCAKE_BLOCK_TOKENS,
               limit: int | None = None) -> Trace:
    """Read and validate a Mooncake-format JSONL trace (the first ``limit`` requests if given)."""
    try:
        with open(path, encoding="utf-8") as lines:
            requests = parse_trace_lines(lines, block_tokens=block_tokens, limit=limit,
                                         source=str(path))
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(f"trace {path} is not UTF-8 text: {exc.reason}") from exc
    return Trace(requests=tuple(requests), block_tokens=block_tokens, source=str(path))


def parse_trace_lines(lines: Iterable[str], *, block_tokens: int = MOONCAKE_BLOCK_TOKENS,
                      limit: int | None = None, source: str = "trace") -> list[TraceRequest]:
    """Parse JSONL lines into requests; raise TraceError naming the first bad line."""
    if block_tokens <= 0:
        raise TraceError(f"block_tokens={block_tokens} is not allowed: must be > 0")
    requests: list[TraceRequest] = []
    checker = _ChainChecker()
    last_ts = float("-inf")
    last_ts_line = 0
    for line_no, request in _numbered_records(lines, block_tokens, source):
        if request.timestamp_ms < last_ts:
            raise TraceError(f"{source} line {line_no}: timestamp {request.timestamp_ms:g} is "
                             f"earlier than {last_ts:g} on line {last_ts_line}; requests must be "
                             "in arrival order")
        last_ts, last_ts_line = request.timestamp_ms, line_no
        checker.check(request.hash_ids, line_no, source)
        requests.append(request)
        if limit is not None and len(requests) >= limit:
            break
    if not requests:
        raise TraceError(f"{source} holds no requests")
    return requests


def _numbered_records(lines: Iterable[str], block_tokens: int,
                      source: str) -> Iterator[tuple[int, TraceRequest]]:
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source} line {line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") \
                from None
        yield line_no, _record(obj, block_tokens, where)


def _record(obj: object, block_tokens: int, where: str) -> TraceRequest:
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object with fields {', '.join(_FIELDS)}, "
                         f"got {type(obj).__name__}")
    for name in _FIELDS:
        if name not in obj:
            raise TraceError(f"{where}: missing field {name!r}")
    timestamp = obj["timestamp"]
    if not _is_number(timestamp) or timestamp < 0:
        raise TraceError(f"{where}: 'timestamp' must be a number >= 0 (ms), got {timestamp!r}")
    input_length = _non_negative_int(obj["input_length"], "input_length", where)
    output_length = _non_negative_int(obj["output_length"], "output_length", where)
    hash_ids = obj["hash_ids"]
    if not isinstance(hash_ids, list):
        raise TraceError(f"{where}: 'hash_ids' must be a list of integers, "
                         f"got {type(hash_ids).__name__}")
    for idx, value in enumerate(hash_ids):
        if not _is_int(value) or value < 0:
            raise TraceError(f"{where}: hash_ids[{idx}] must be an integer >= 0, got {value!r}")
    expected = -(-input_length // block_tokens)
    if len(hash_ids) != expected:
        raise TraceError(f"{where}: hash_ids has {len(hash_ids)} entries but input_length "
                         f"{input_length} needs ceil({input_length}/{block_tokens}) = {expected} "
                         f"(is the tokens-per-block setting right? it is {block_tokens})")
    return TraceRequest(timestamp_ms=float(timestamp), input_length=input_length,
                        output_length=output_length, hash_ids=tuple(hash_ids))


class _ChainChecker:
    """Checks the chained-id contract: an id always follows the same parent id.

    Prefix matching is only meaningful if it holds (two requests with equal ids at position k
    must agree on every earlier id); a trace that breaks it was remapped wrongly.
    """

    _ROOT = -1

    def __init__(self) -> None:
        self._parent: dict[int, int] = {}
        self._first_line: dict[int, int] = {}

    def check(self, hash_ids: Sequence[int], line_no: int, source: str) -> None:
        parent_of = self._parent
        parent = self._ROOT
        for idx, block in enumerate(hash_ids):
            known = parent_of.setdefault(block, parent)
            if known != parent:
                self._fail(block, idx, parent, known, line_no, source)
            self._first_line.setdefault(block, line_no)
            parent = block

    def _fail(self, block: int, idx: int, parent: int, known: int, line_no: int,
              source: str) -> None:
        def describe(p: int) -> str:
            return "starts the request" if p == self._ROOT else f"follows id {p}"
        raise TraceError(f"{source} line {line_no}: hash_ids[{idx}] = {block} {describe(parent)}, "
                         f"but on line {self._first_line.get(block, '?')} it {describe(known)}; "
                         "hash ids must be chained (same id => same prefix)")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _non_negative_int(value: object, name: str, where: str) -> int:
    if not _is_int(value) or value < 0:
        raise TraceError(f"{where}: {name!r} must be an integer >= 0, got {value!r}")
    return value
