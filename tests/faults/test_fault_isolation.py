"""Tenants and secrets: different cache_salt never share blocks in any tier (host, disk, and
the disk after a restart); the disk tier's files are private; logs carry no token ids by
default and no credentials ever.
"""

from __future__ import annotations

import logging
import os
import random
import stat
import string

import pytest
from fault_scenarios import (
    Spec,
    close,
    count_leaks,
    disk_only,
    drive,
    host_and_disk,
    make_fault_harness,
    metric,
    prompt,
    wrong_tokens,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sched_harness import BLOCK

from kvtier.config import load_config, redact_url
from kvtier.errors import ConfigError
from kvtier.storage import faults


def tier_hits(h) -> float:
    return sum(metric(h, "kvtier_matched_blocks", tier=t) for t in ("G2", "G3"))


def ask(h, spec: Spec) -> float:
    """Run one request on a device cache that forgot everything; kvtier blocks it loaded."""
    h.scheduler.reset_prefix_cache()
    before = tier_hits(h)
    assert drive(h, [spec]) == []
    h.drain()
    return tier_hits(h) - before


CONFIGS = {
    "host": lambda tmp: {"host_cache_blocks": 128, "onboard_mode": "always"},
    "disk": lambda tmp: disk_only(tmp),
    "host+disk": lambda tmp: host_and_disk(tmp, host=64),
}


@pytest.mark.parametrize("tiers", list(CONFIGS))
def test_salts_never_share_blocks_in_any_tier(tiny_model, tmp_path, tiers):
    h = make_fault_harness(tiny_model, CONFIGS[tiers](tmp_path))
    p = prompt(11, 6 * BLOCK + 1)
    tail = prompt(12, 5)
    specs = [Spec("alice", p, salt="tenant-a"), Spec("bob", p + tail, salt="tenant-b"),
             Spec("anon", p + tail), Spec("alice2", p + tail, salt="tenant-a")]
    try:
        assert ask(h, specs[0]) == 0
        assert ask(h, specs[1]) == 0, "tenant-b was served tenant-a's blocks"
        assert ask(h, specs[2]) == 0, "an unsalted request was served tenant-a's blocks"
        assert ask(h, specs[3]) == 6, "tenant-a's own blocks should come back"
        assert h.wrong_blocks == 0 and wrong_tokens(h, specs) == 0
        assert count_leaks(h) == 0
    finally:
        close(h)


def test_salts_stay_apart_on_disk_across_a_restart(tiny_model, tmp_path):
    extra = disk_only(tmp_path)
    p = prompt(13, 5 * BLOCK + 1)
    h = make_fault_harness(tiny_model, extra)
    try:
        drive(h, [Spec("alice", p, salt="tenant-a")])
        h.drain()
    finally:
        close(h)
    h = make_fault_harness(tiny_model, extra)
    try:
        assert ask(h, Spec("bob", p + [5], salt="tenant-b")) == 0
        assert ask(h, Spec("alice2", p + [5], salt="tenant-a")) == 5
        assert metric(h, "kvtier_matched_blocks", tier="G3") == 5
        assert h.wrong_blocks == 0 and count_leaks(h) == 0
    finally:
        close(h)


def test_disk_tier_files_are_private(tiny_model, tmp_path):
    extra = disk_only(tmp_path)
    h = make_fault_harness(tiny_model, extra)
    try:
        drive(h, [Spec("r", prompt(14, 4 * BLOCK + 1))])
        h.drain()
        found = 0
        for root, dirs, files in os.walk(extra["disk_dir"]):
            for name in dirs:
                mode = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
                assert mode == 0o700, f"{name}: {oct(mode)}"
            for name in files:
                mode = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
                assert mode == 0o600, f"{name}: {oct(mode)}"
                found += 1
        assert found >= 3  # data, journal, lock
    finally:
        close(h)


def test_no_token_ids_in_kvtier_logs_by_default(tiny_model, tmp_path, caplog):
    """A run at INFO with faults that make kvtier log warnings: no prompt token id appears in
    any kvtier log record (distinctive ids, so a leak cannot hide)."""
    rng = random.Random(15)
    prompts = [[rng.randint(700_000, 799_999) for _ in range(5 * BLOCK + 2)] for _ in range(3)]
    with caplog.at_level(logging.INFO):
        h = make_fault_harness(tiny_model, disk_only(tmp_path))
        try:
            with faults.armed("disk.write", "enospc", probability=0.3, seed=2):
                drive(h, [Spec(f"a{i}", p) for i, p in enumerate(prompts)])
                h.drain()
            with faults.armed("disk.read", "flip", probability=0.5, seed=1):
                for i, p in enumerate(prompts):
                    ask(h, Spec(f"b{i}", p + [800_001 + i]))
        finally:
            close(h)
    records = [r for r in caplog.records if r.name.startswith("kvtier")]
    text = "\n".join(r.getMessage() for r in records)
    assert sum(r.levelno >= logging.WARNING for r in records) >= 2, "the faults logged nothing"
    leaked = sorted({t for p in prompts for t in p if str(t) in text})
    assert not leaked, f"token ids in kvtier logs: {leaked[:5]}"


SECRET = "Sup3r-Secret-pw"


def test_credentials_in_remote_url_never_reach_logs_or_errors(tiny_model, caplog):
    url = f"redis://:{SECRET}@127.0.0.1:1/0"
    with caplog.at_level(logging.DEBUG):
        h = make_fault_harness(tiny_model, {"host_cache_blocks": 16, "remote_url": url})
        close(h)
        errors = []
        for extra in ({"remote_url": url, "metrics_port": "not-a-port"},
                      {"remote_url": f"{SECRET}@nohost"},
                      {"remote_url": url, "host_cache_gb": -1}):
            with pytest.raises(ConfigError) as info:
                load_config(extra, env={})
            errors.append(str(info.value))
        with pytest.raises(ConfigError) as info:
            load_config({}, env={"KVTIER_REMOTE_URL": url, "KVTIER_HOST_CACHE_GB": "x"})
        errors.append(str(info.value))
    assert "***" in caplog.text  # the connector did log the (redacted) remote URL
    assert SECRET not in caplog.text
    for message in errors:
        assert SECRET not in message, message


URL_SAFE = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:%@"


@settings(max_examples=200, deadline=None)
@given(scheme=st.sampled_from(["redis", "mooncake", "rediss", "s3"]),
       user=st.text(alphabet=string.ascii_letters + string.digits, max_size=6),
       password=st.text(alphabet=URL_SAFE, min_size=8, max_size=20),
       host=st.sampled_from(["127.0.0.1", "cache.example", "[::1]"]),
       rest=st.sampled_from(["", "/0", ":6379/1", ":50051?metadata=http://h:8080/metadata"]))
def test_redacted_urls_never_contain_the_password(scheme, user, password, host, rest):
    assume(password not in f"{scheme}://{user}:@{host}{rest}")  # it must be tellable apart
    url = f"{scheme}://{user}:{password}@{host}{rest}"
    shown = redact_url(url)
    assert password not in shown
    assert host in shown


@pytest.mark.parametrize("url", [f"redis://:{SECRET[:6]}@{SECRET[6:]}@127.0.0.1:6379/0",
                                 f"redis://127.0.0.1:6379/0?password={SECRET}"])
def test_redact_url_hides_every_form_of_password(url):
    """Found by this suite: a raw '@' in the password and ?password= leaked (now fixed)."""
    shown = redact_url(url)
    assert SECRET[6:] not in shown and SECRET not in shown
