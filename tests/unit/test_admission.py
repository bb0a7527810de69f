"""kvtier.offload.admission: always/never and KVBM's frequency filter."""

from __future__ import annotations

import pytest

from kvtier.errors import ConfigError
from kvtier.offload.admission import (
    AdmissionPolicy,
    AlwaysAdmit,
    FrequencyFilter,
    NeverAdmit,
    admission_policy_names,
    make_admission_policy,
    register_admission_policy,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_always_and_never():
    assert make_admission_policy("always").admit(1) is True
    assert make_admission_policy("never").admit(1) is False
    assert isinstance(make_admission_policy("always"), AlwaysAdmit)
    assert isinstance(make_admission_policy("never"), NeverAdmit)


def test_registry_errors_name_the_choices():
    assert {"always", "never", "frequency"} <= set(admission_policy_names())
    with pytest.raises(ConfigError, match="'lfu' is not known: use one of .*frequency"):
        make_admission_policy("lfu")
    with pytest.raises(ConfigError, match="bad options"):
        make_admission_policy("always", threshold=3)
    with pytest.raises(TypeError):
        register_admission_policy(int)

    @register_admission_policy
    class Odd(AdmissionPolicy):
        name = "test-odd"

        def admit(self, key):
            return key % 2 == 1

    assert make_admission_policy("test-odd").admit(3)
    with pytest.raises(ValueError, match="taken"):
        @register_admission_policy
        class Clash(Odd):
            name = "test-odd"


def test_frequency_filter_admits_from_the_second_offer():
    policy = make_admission_policy("frequency", clock=FakeClock())
    assert isinstance(policy, FrequencyFilter)
    assert policy.admit("a") is False
    assert policy.count_of("a") == 1
    assert policy.admit("a") is True
    assert policy.admit("a") is True
    assert policy.count_of("a") == 4
    assert policy.admit("b") is False
    assert policy.count_of("zz") == 0 and len(policy) == 2


def test_frequency_filter_min_count():
    policy = FrequencyFilter(min_count=4, clock=FakeClock())
    assert [policy.admit(7) for _ in range(4)] == [False, False, True, True]


def test_frequency_filter_decays_every_period():
    clock = FakeClock()
    policy = FrequencyFilter(decay_seconds=600, clock=clock)
    policy.admit("once")
    policy.admit("twice")
    policy.admit("twice")  # count 2
    clock.now += 599
    policy.admit("other")
    assert policy.count_of("once") == 1 and policy.count_of("twice") == 2
    clock.now += 1  # one full period since start: every count drops by 1, zeros go
    assert policy.admit("twice") is True  # 2 -> 1, then doubled to 2
    assert policy.count_of("once") == 0 and policy.count_of("other") == 0
    assert len(policy) == 1
    assert policy.admit("once") is False  # forgotten: starts again at 1
    clock.now += 3 * 600  # three periods at once
    policy.admit("new")
    assert policy.count_of("twice") == 0 and len(policy) == 1


def test_frequency_filter_forces_decay_when_full():
    clock = FakeClock()
    policy = FrequencyFilter(max_entries=3, clock=clock)
    for key in ("hot", "hot", "hot"):  # count 4
        policy.admit(key)
    policy.admit("a")
    policy.admit("b")
    assert len(policy) == 3
    assert policy.admit("c") is False  # 4 entries > 3: decay until they fit
    assert len(policy) <= 3
    assert policy.count_of("hot") == 3
    assert policy.count_of("a") == policy.count_of("c") == 0
    # The decay period restarted at the forced decay.
    clock.now += 599
    policy.admit("hot")
    assert policy.count_of("hot") == 6


@pytest.mark.parametrize("options", [{"min_count": 0}, {"decay_seconds": 0},
                                     {"max_entries": 0}])
def test_frequency_filter_rejects_bad_options(options):
    with pytest.raises(ConfigError):
        FrequencyFilter(**options)
