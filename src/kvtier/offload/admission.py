"""Admission policies: whether a block offered to a tier should be written there.

``admit(key)`` is an offer: it answers and may update the policy's state (a frequency filter
counts offers). Policies register by name with ``@register_admission_policy`` and are built
with ``make_admission_policy(name, **options)``. No torch, no I/O.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from typing import Any, ClassVar

from kvtier.errors import ConfigError
from kvtier.registry import Registry
from kvtier.tiers import BlockKey

__all__ = [
    "AdaptiveAdmission",
    "AdmissionPolicy",
    "AlwaysAdmit",
    "FrequencyFilter",
    "NeverAdmit",
    "admission_policy_names",
    "make_admission_policy",
    "register_admission_policy",
]


class AdmissionPolicy(abc.ABC):
    name: ClassVar[str]
    takes_clock: ClassVar[bool] = False   # its constructor takes ``clock=``

    @abc.abstractmethod
    def admit(self, key: BlockKey) -> bool:
        """Offer ``key``: True if it should be written to the tier."""

    def bind(self, capacity: int, num_free: Callable[[], int]) -> None:
        """The tier's size in blocks and a reader of its free slots; policies that weigh
        occupancy keep them (the tier calls this once, before any offer)."""

    def on_hit(self, key: BlockKey) -> None:
        """The tier served ``key`` (a load from it); policies that learn from hits count it."""


# More built-in policies register when kvtier.offload.tinylfu is imported.
_REGISTRY: Registry[type[AdmissionPolicy]] = Registry("admission policy", AdmissionPolicy,
                                                      ("kvtier.offload.tinylfu",))
register_admission_policy = _REGISTRY.register


def admission_policy_names() -> list[str]:
    """Every registered policy name, built-in modules included."""
    return _REGISTRY.names()


def make_admission_policy(name: str, *, clock: Callable[[], float] | None = None,
                          **options: Any) -> AdmissionPolicy:
    """A policy by registered name; ``options`` go to its constructor. ``clock`` (seconds) is
    the time base of policies that decay with time (a replay passes its trace's clock);
    policies without one ignore it."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"admission policy {name!r} is not known: use one of "
                          f"{', '.join(admission_policy_names())}")
    if clock is not None and cls.takes_clock:
        options["clock"] = clock
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"admission policy {name!r}: bad options {sorted(options)}: {exc}"
                          ) from exc


@register_admission_policy
class AlwaysAdmit(AdmissionPolicy):
    name = "always"

    def admit(self, key: BlockKey) -> bool:
        return True


@register_admission_policy
class NeverAdmit(AdmissionPolicy):
    name = "never"

    def admit(self, key: BlockKey) -> bool:
        return False


# Keeps doubling counters bounded (a key offered thousands of times stays admitted).
_MAX_COUNT = 1 << 62


@register_admission_policy
class FrequencyFilter(AdmissionPolicy):
    """KVBM's disk filter ("SSD lifespan protection"): admit a key from its second offer.

    A key's counter starts at 1 on its first offer and doubles on each re-offer; the key is
    admitted while its counter is at least ``min_count`` (default 2, so a block seen once never
    reaches disk). Every ``decay_seconds`` of the clock every counter drops by 1 and zeros are
    forgotten; when more than ``max_entries`` keys are tracked, decay rounds run at once until
    they fit (and the decay period restarts). Decay is applied lazily, on the next offer.
    """

    name = "frequency"
    takes_clock = True

    def __init__(self, min_count: int = 2, decay_seconds: float = 600.0,
                 max_entries: int = 1_000_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if min_count < 1:
            raise ConfigError(f"frequency filter: min_count={min_count} must be >= 1")
        if decay_seconds <= 0:
            raise ConfigError(f"frequency filter: decay_seconds={decay_seconds} must be > 0")
        if max_entries < 1:
            raise ConfigError(f"frequency filter: max_entries={max_entries} must be >= 1")
        self.min_count = min_count
        self.decay_seconds = decay_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._counts: dict[BlockKey, int] = {}
        self._last_decay = clock()

    def admit(self, key: BlockKey) -> bool:
        now = self._clock()
        rounds = int((now - self._last_decay) // self.decay_seconds)
        if rounds > 0:
            self._decay(rounds)
            self._last_decay += rounds * self.decay_seconds
        counts = self._counts
        count = counts.get(key)
        count = 1 if count is None else min(count * 2, _MAX_COUNT)
        counts[key] = count
        if len(counts) > self.max_entries:
            # Forced decay (KVBM's oversize notification); the decision above stands.
            while len(self._counts) > self.max_entries:
                self._decay(1)
            self._last_decay = now
        return count >= self.min_count

    def count_of(self, key: BlockKey) -> int:
        """The key's current counter (0 when not tracked); no offer, no decay."""
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)

    def _decay(self, rounds: int) -> None:
        self._counts = {key: count - rounds for key, count in self._counts.items()
                        if count > rounds}


@register_admission_policy
class AdaptiveAdmission(AdmissionPolicy):
    """Admit first sightings while doing so pays, filter them (like ``frequency``) when not.

    A re-offered key (offered before, within memory) is always admitted. A first sighting is
    admitted when the tier has a free slot (filling one costs nothing), when its key falls in
    the exploration sample (one key in ``explore_every``, by hash: it keeps measuring what first
    sightings are worth while the filter is on), or when first sightings have lately earned at
    least ``min_ratio`` times the hits per admitted block that re-offered keys earned. Hits are
    the tier's loads of an admitted block (``on_hit``), counted while the block is among the
    last ``2 x capacity`` admissions; counts halve every ``window`` admissions. Per offer or hit:
    O(1); memory: ``seen_factor x capacity`` offered keys and ``2 x capacity`` admitted ones.
    """

    name = "adaptive"

    def __init__(self, min_ratio: float = 0.7, explore_every: int = 64, window: int = 4096,
                 seen_factor: int = 1000, max_entries: int = 1_000_000) -> None:
        if min_ratio < 0:
            raise ConfigError(f"adaptive admission: min_ratio={min_ratio} must be >= 0")
        if explore_every < 1 or window < 1 or seen_factor < 1 or max_entries < 1:
            raise ConfigError("adaptive admission: explore_every, window, seen_factor and "
                              "max_entries must be >= 1")
        from kvtier.offload.tinylfu import key64  # tinylfu imports this module
        self._key64 = key64
        self.min_ratio = min_ratio
        self.explore_every = explore_every
        self.window = window
        self.seen_factor = seen_factor
        self._num_free: Callable[[], int] = lambda: 0
        self._max_seen = max_entries
        self._max_tagged = max_entries
        self._seen: dict[BlockKey, None] = {}          # offered keys, oldest first
        self._tagged: dict[BlockKey, int] = {}         # admitted key -> 0 first sight, 1 re-offer
        self._admits = [0.0, 0.0]
        self._hits = [0.0, 0.0]
        self._since_halving = 0

    def bind(self, capacity: int, num_free: Callable[[], int]) -> None:
        """The tier's size and a reader of its free slots (a tier calls this once)."""
        self._num_free = num_free
        self._max_seen = min(self._max_seen, max(1024, self.seen_factor * capacity))
        self._max_tagged = min(self._max_tagged, max(1024, 2 * capacity))

    def first_sightings_pay(self) -> bool:
        """Whether first sightings lately earned ``min_ratio`` of re-offers' hits per block."""
        admits, hits = self._admits, self._hits
        # One pseudo-hit in two pseudo-admissions: an unmeasured class counts as paying.
        first = (hits[0] + 1) / (admits[0] + 2)
        repeat = (hits[1] + 1) / (admits[1] + 2)
        return first >= self.min_ratio * repeat

    def admit(self, key: BlockKey) -> bool:
        seen = self._seen
        if key in seen:
            cls = 1
        else:
            seen[key] = None
            if len(seen) > self._max_seen:
                del seen[next(iter(seen))]
            cls = 0
            if not (self._num_free() > 0 or self._key64(key) % self.explore_every == 0
                    or self.first_sightings_pay()):
                return False
        self._tag(key, cls)
        return True

    def on_hit(self, key: BlockKey) -> None:
        cls = self._tagged.get(key)
        if cls is not None:
            self._hits[cls] += 1

    def _tag(self, key: BlockKey, cls: int) -> None:
        tagged = self._tagged
        tagged.pop(key, None)
        tagged[key] = cls
        if len(tagged) > self._max_tagged:
            del tagged[next(iter(tagged))]
        self._admits[cls] += 1
        self._since_halving += 1
        if self._since_halving >= self.window:
            self._since_halving = 0
            self._admits = [n / 2 for n in self._admits]
            self._hits = [n / 2 for n in self._hits]
