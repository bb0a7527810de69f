"""Fault injection for the storage layer: for tests and fault benchmarks, off in production.

Storage code consults this module at a few marked places, each behind ``if faults.active:``;
with no fault armed that is one module attribute read and one branch. Faults are armed only by
an explicit call in the process that wants them (``arm``, ``armed`` or ``arm_spec``); nothing
here reads the environment (``config.py`` owns the ``KVTIER_*`` variables and rejects unknown
ones), so a production process cannot switch this on by accident.

Points, and the kinds of fault each understands:

=============  ==========================================  ========================================
point          where                                       kinds
=============  ==========================================  ========================================
disk.write     ``DiskStorage`` vectored write of a run     ``enospc``, ``eio`` (the call fails),
                                                           ``short`` (half a slot really written),
                                                           ``delay``
disk.sync      ``fdatasync`` of the data file before       ``eio``, ``delay``
               journalling writes, and of the journal
               after each append (writes, invalidations)
disk.read      ``DiskStorage`` vectored read of a run      ``eio``, ``short`` (half a slot read),
                                                           ``flip`` (a payload byte flipped after
                                                           the read: corruption in transit),
                                                           ``delay``
remote.put     ``RemoteBackend.batch_put``'s store call    ``error`` (the client raises),
remote.get     ``RemoteBackend.batch_get_into``'s call     ``timeout`` (the call stalls past
                                                           ``timeout_s``), ``partial`` (some keys
                                                           fail), ``delay``; get also ``corrupt``
                                                           (one value's payload byte flipped)
host.load      ``Worker`` G2 -> G1 onboarding of a load    ``flip``: one payload byte of the
               op, on its blocks that were in G2 before    middle block (index len//2) flipped in
               the load, before they are verified          its G2 slot (host memory corruption
                                                           between store and load: verification
                                                           must catch it, a counted miss)
onboard.bypass ``Worker`` G2 -> G1 onboarding of a load    damage verification cannot see, for
               op, after its blocks were verified and      negative controls: ``zero`` (the middle
               scattered: applied to the device blocks     block, index len//2, zeroed on the
               just written (through ``DeviceKV``, in      device), ``swap`` (the middle block's
               any layout)                                 bytes replaced by those of a G2 slot
                                                           outside this load, e.g. another
                                                           prompt's block; else the op's first
                                                           block), ``shift`` (device block i gets
                                                           the bytes meant for block i+1, the last
                                                           block unchanged)
=============  ==========================================  ========================================

Both ``host.load`` and ``onboard.bypass`` fire at most once per load op (a "call" is one op).

A rule skips its first ``after`` matching calls, then fires with ``probability`` (a seeded RNG;
with several I/O threads, which call it hits still depends on their timing) at most ``times``
times (``None``: no limit). ``fired`` counts what fired, for reports. Rules may be armed and
disarmed from any thread; the first armed rule that fires on a call wins.

    with faults.armed("disk.read", "eio", probability=0.5, seed=1):
        ...                                    # half the disk reads fail with EIO
    faults.arm_spec("disk.write:enospc:p=0.3,disk.sync:delay:delay_s=0.02")
    faults.disarm()                            # every rule, and ``active`` is False again
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import numpy as np

from kvtier.errors import ConfigError
from kvtier.storage.block_format import HEADER_BYTES, MAGIC  # the payload follows the header

_PAGE = 4096  # O_DIRECT alignment of a partial transfer

KINDS: dict[str, tuple[str, ...]] = {
    "disk.write": ("enospc", "eio", "short", "delay"),
    "disk.sync": ("eio", "delay"),
    "disk.read": ("eio", "short", "flip", "delay"),
    "remote.put": ("error", "timeout", "partial", "delay"),
    "remote.get": ("error", "timeout", "partial", "corrupt", "delay"),
    "host.load": ("flip",),
    "onboard.bypass": ("zero", "swap", "shift"),
}
_ERRNO = {"enospc": errno.ENOSPC, "eio": errno.EIO}

# True while at least one rule is armed; storage code tests this before anything else.
active = False

_lock = threading.Lock()
_rules: list[FaultRule] = []


@dataclasses.dataclass(eq=False)
class FaultRule:
    point: str
    kind: str
    probability: float = 1.0
    times: int | None = None
    after: int = 0
    seed: int = 0
    delay_s: float = 0.05
    seen: int = 0    # matching calls so far
    fired: int = 0   # of those, calls this rule broke
    _rng: random.Random = dataclasses.field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        allowed = KINDS.get(self.point)
        if allowed is None:
            raise ConfigError(f"fault point {self.point!r} is not allowed: use one of "
                              f"{', '.join(KINDS)}")
        if self.kind not in allowed:
            raise ConfigError(f"fault kind {self.kind!r} is not allowed at {self.point}: use "
                              f"one of {', '.join(allowed)}")
        if not 0.0 <= self.probability <= 1.0:
            raise ConfigError(f"fault probability={self.probability} is not allowed: use 0..1")
        if (self.times is not None and self.times < 0) or self.after < 0 or self.delay_s < 0:
            raise ConfigError("fault times, after and delay_s must be >= 0")
        self._rng.seed(self.seed)

    def _take(self) -> bool:
        """Whether this call is broken (caller holds the lock)."""
        self.seen += 1
        if self.seen <= self.after or (self.times is not None and self.fired >= self.times):
            return False
        if self.probability < 1.0 and self._rng.random() >= self.probability:
            return False
        self.fired += 1
        return True


# -- arming -------------------------------------------------------------------------------------


def arm(point: str, kind: str, **options: Any) -> FaultRule:
    """Arm one rule (see the module doc for points, kinds and options); returns it."""
    global active
    rule = FaultRule(point, kind, **options)
    with _lock:
        _rules.append(rule)
        active = True
    return rule


def disarm(rule: FaultRule | None = None) -> None:
    """Remove ``rule``, or every rule when None."""
    global active
    with _lock:
        if rule is None:
            _rules.clear()
        elif rule in _rules:
            _rules.remove(rule)
        active = bool(_rules)


@contextlib.contextmanager
def armed(point: str, kind: str, **options: Any) -> Iterator[FaultRule]:
    """``arm`` for the duration of a ``with`` block."""
    rule = arm(point, kind, **options)
    try:
        yield rule
    finally:
        disarm(rule)


def arm_spec(spec: str) -> list[FaultRule]:
    """Arm rules from text such as ``"disk.read:eio:p=0.5:times=3,remote.get:timeout"``.

    Options: ``p`` (probability), ``times``, ``after``, ``seed``, ``delay_s``. For child
    processes and benchmark command lines; ``ConfigError`` names what is wrong.
    """
    rules = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, rest = item.partition(":")
        kind, _, opts = rest.partition(":")
        options: dict[str, Any] = {}
        for opt in filter(None, opts.split(":")):
            name, sep, value = opt.partition("=")
            try:
                if not sep:
                    raise ValueError
                if name == "p":
                    options["probability"] = float(value)
                elif name in ("times", "after", "seed"):
                    options[name] = int(value)
                elif name == "delay_s":
                    options[name] = float(value)
                else:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"fault spec {item!r}: option {opt!r} is not allowed: use "
                                  "p=, times=, after=, seed= or delay_s=") from None
        rules.append(arm(point, kind, **options))
    return rules


def fired(point: str | None = None, kind: str | None = None) -> int:
    """How many calls the armed rules broke (optionally of one point and/or kind)."""
    with _lock:
        return sum(r.fired for r in _rules
                   if (point is None or r.point == point) and (kind is None or r.kind == kind))


def _pick(point: str) -> FaultRule | None:
    with _lock:
        for rule in _rules:
            if rule.point == point and rule._take():
                return rule
    return None


# -- disk hooks ---------------------------------------------------------------------------------


def vector_io(write: bool, fd: int, buffers: list, offset: int) -> int:
    """``os.pwritev``/``os.preadv`` with the armed disk.write/disk.read fault applied.

    Faults look exactly like the kernel's: an ``OSError`` with its errno, or fewer bytes moved
    than asked (and then only those bytes really moved), or bytes that arrive changed.
    """
    io = os.pwritev if write else os.preadv
    rule = _pick("disk.write" if write else "disk.read")
    if rule is None:
        return io(fd, buffers, offset)
    kind = rule.kind
    if kind == "delay":
        time.sleep(rule.delay_s)
        return io(fd, buffers, offset)
    if kind in _ERRNO:
        code = _ERRNO[kind]
        raise OSError(code, f"{os.strerror(code)} (injected fault)")
    if kind == "short":
        part = len(buffers[0]) // 2 // _PAGE * _PAGE  # stays O_DIRECT-aligned
        return io(fd, [buffers[0][:part]], offset) if part else 0
    moved = io(fd, buffers, offset)  # "flip"
    if moved > HEADER_BYTES:
        buffers[0][HEADER_BYTES] ^= rule._rng.randrange(1, 256)
    return moved


def before_sync() -> None:
    """Called just before a disk tier ``fdatasync`` (data file or journal): the armed
    disk.sync fault."""
    rule = _pick("disk.sync")
    if rule is None:
        return
    if rule.kind == "delay":
        time.sleep(rule.delay_s)
        return
    raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected fault)")


# -- remote hook --------------------------------------------------------------------------------


# The per-key outcome a "partial" fault reports for the keys it fails: the remote contract's
# ``FAILED`` (kvtier.storage.remote.base), which passes its own. Kept here, not imported, so
# that this module never imports remote code (remote/base.py imports this one).
REMOTE_FAILED = -4


def remote_call(point: str, fn: Callable[..., list], timeout_s: float, *,
                failed: int = REMOTE_FAILED) -> Callable[..., list]:
    """Wrap a backend's store call (``_store``/``_fetch``: ``fn(names, views)``) so that the
    armed remote.put/remote.get fault applies when it runs on the backend's call thread.
    ``failed``: the per-key outcome of a key a "partial" fault fails."""

    def call(names: list[str], views: list) -> list:
        rule = _pick(point)
        if rule is None:
            return fn(names, views)
        kind = rule.kind
        if kind == "error":
            raise ConnectionError("store connection lost (injected fault)")
        if kind in ("timeout", "delay"):
            # A stalled store: the caller gives up after timeout_s; the call finishes later.
            time.sleep(max(rule.delay_s, 2 * timeout_s) if kind == "timeout" else rule.delay_s)
            return fn(names, views)
        result = list(fn(names, views))
        if not result:
            return result
        if kind == "partial":
            # Fail some keys, never all (a whole-batch failure is "error").
            victims = rule._rng.sample(range(len(result)), max(1, len(result) // 2))
            if len(result) == 1 or len(victims) < len(result):
                for idx in victims:
                    result[idx] = failed
            return result
        idx = rule._rng.randrange(len(result))  # "corrupt"
        entry = result[idx]
        if isinstance(entry, int):
            if entry > HEADER_BYTES:  # read straight into the caller's buffer
                views[idx][HEADER_BYTES] ^= 0xFF
        elif entry is not None and len(entry) > HEADER_BYTES:
            changed = bytearray(entry)
            changed[HEADER_BYTES] ^= 0xFF
            result[idx] = bytes(changed)
        return result

    return call


# -- onboarding hooks (worker, G2 -> G1) ---------------------------------------------------------


def host_load(arena: Any, slots: Sequence[int]) -> None:
    """Called with a load op's G2 slots (its blocks that were in G2 before the load, in op
    order) just before they are verified: the armed host.load fault flips one payload byte of
    the middle one in the arena, as a host memory error would."""
    if not slots:
        return
    rule = _pick("host.load")
    if rule is None:
        return
    payload = arena.payload(slots[len(slots) // 2])
    payload[rule._rng.randrange(payload.size)] ^= rule._rng.randrange(1, 256)


def onboard_bypass(dev: Any, arena: Any, slots: Sequence[int], block_ids: Sequence[int],
                   load_slots: Collection[int]) -> None:
    """Called after a load op scattered G2 ``slots`` into device ``block_ids`` (the blocks
    that passed verification, in op order; ``load_slots``: every G2 slot of the op): the armed
    onboard.bypass fault damages the device blocks as if verification had been bypassed.
    Device bytes change only through ``dev``'s segments, so any layout is respected."""
    if not block_ids:
        return
    rule = _pick("onboard.bypass")
    if rule is None:
        return
    from kvtier.transfer.copy import copy_host_to_device  # transfer imports storage

    middle = len(block_ids) // 2
    if rule.kind == "zero":
        for segment in range(len(dev.segments)):
            dev.block_bytes_view(segment)[block_ids[middle]].zero_()
    elif rule.kind == "swap":
        other = _other_block_slot(arena, load_slots)
        source = slots[0] if other is None else other
        copy_host_to_device(arena, [source], dev, [block_ids[middle]])
    elif len(block_ids) > 1:  # "shift"
        copy_host_to_device(arena, list(slots[1:]), dev, list(block_ids[:-1]))


def _other_block_slot(arena: Any, exclude: Collection[int]) -> int | None:
    """The first arena slot outside ``exclude`` whose header says it holds a block."""
    stamped = np.flatnonzero((arena.slots_array[:, :len(MAGIC)]
                              == np.frombuffer(MAGIC, dtype=np.uint8)).all(axis=1))
    excluded = set(exclude)
    for slot in stamped.tolist():
        if slot not in excluded:
            return slot
    return None
