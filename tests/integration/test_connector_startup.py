"""Bad set-ups stop start-up with one clear message naming what is wrong."""

from __future__ import annotations

import pytest
import torch
from sched_harness import HEAD, HEADS, LAYERS, make_harness
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from kvtier.connectors.vllm import KvtierConnector
from kvtier.errors import ConfigError, LayoutError, StorageError


def vllm_config(tiny_model, extra):
    harness = make_harness(tiny_model, {"host_cache_blocks": 16})
    vc = harness.scheduler.vllm_config
    vc.kv_transfer_config.kv_connector_extra_config = extra
    return vc, harness.scheduler.kv_cache_config


@pytest.mark.parametrize("extra, message", [
    ({"host_cache_gbs": 4}, "unknown setting 'host_cache_gbs'"),
    ({"host_cache_gb": "four"}, "host_cache_gb='four'"),
    ({}, "no tier configured"),
    ({"disk_cache_gb": 1}, "disk_dir is required"),
])
def test_bad_config_is_one_clear_error(tiny_model, extra, message):
    vc, kvc = vllm_config(tiny_model, extra)
    for role in (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER):
        with pytest.raises(ConfigError) as err:
            KvtierConnector(vc, role, kvc)
        assert message in str(err.value)
        assert str(err.value).startswith("kvtier:")


def test_unwritable_disk_dir_names_the_path(tiny_model, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the directory should be")
    vc, kvc = vllm_config(tiny_model, {"disk_cache_blocks": 64,
                                       "disk_dir": str(blocker / "cache")})
    worker = KvtierConnector(vc, KVConnectorRole.WORKER, kvc)
    kv = {name: torch.zeros(8, HEADS, 16, 2 * HEAD, dtype=torch.bfloat16) for name in LAYERS}
    with pytest.raises(StorageError) as err:
        worker.register_kv_caches(kv)
    assert str(blocker) in str(err.value)


@pytest.mark.parametrize("make_kv, message", [
    # Layers disagree on dtype.
    (lambda: {LAYERS[0]: torch.zeros(8, HEADS, 16, 2 * HEAD, dtype=torch.bfloat16),
              LAYERS[1]: torch.zeros(8, HEADS, 16, 2 * HEAD, dtype=torch.float32)},
     "dtype torch.float32 differs"),
    # A shape no supported layout has.
    (lambda: {name: torch.zeros(8, 3, 5, dtype=torch.bfloat16) for name in LAYERS},
     "cannot tell the KV layout of shape (8, 3, 5)"),
    # Right layout, but not the geometry the engine's KV cache spec announced.
    (lambda: {name: torch.zeros(8, HEADS, 16, HEAD, dtype=torch.bfloat16) for name in LAYERS},
     "bytes per block"),
])
def test_unsupported_layout_is_refused(tiny_model, make_kv, message):
    vc, kvc = vllm_config(tiny_model, {"host_cache_blocks": 16})
    worker = KvtierConnector(vc, KVConnectorRole.WORKER, kvc)
    with pytest.raises(LayoutError) as err:
        worker.register_kv_caches(make_kv())
    assert message in str(err.value)


def test_a_host_tier_larger_than_the_machines_memory_is_refused_at_start(tiny_model):
    from kvtier.storage.host import available_memory_bytes

    available = available_memory_bytes()
    assert available, "this test needs /proc/meminfo"
    vc, kvc = vllm_config(tiny_model, {"host_cache_gb": round(4 * available / 1e9)})
    worker = KvtierConnector(vc, KVConnectorRole.WORKER, kvc)
    kv = {name: torch.zeros(8, HEADS, 16, 2 * HEAD, dtype=torch.bfloat16) for name in LAYERS}
    with pytest.raises(StorageError) as err:
        worker.register_kv_caches(kv)
    assert "does not fit" in str(err.value) and "host_cache_gb" in str(err.value)


@pytest.mark.parametrize("url, message", [
    ("redis://127.0.0.1:notaport/0", "Port could not be cast"),
    ("redis://[::1/0", "remote_url='redis://[::1/0' is not allowed"),
    ("mooncake://127.0.0.1:50051", "needs metadata=URL"),
    ("s4://bucket", "unknown scheme"),
])
def test_a_store_url_that_does_not_parse_is_one_clear_error_at_start(tiny_model, url, message):
    vc, kvc = vllm_config(tiny_model, {"host_cache_blocks": 16, "remote_url": url})
    worker = KvtierConnector(vc, KVConnectorRole.WORKER, kvc)
    kv = {name: torch.zeros(8, HEADS, 16, 2 * HEAD, dtype=torch.bfloat16) for name in LAYERS}
    with pytest.raises(ConfigError) as err:
        worker.register_kv_caches(kv)
    assert message in str(err.value)
