import importlib.util
import logging
import sys
import types

import pytest

import kvtier.config
from kvtier.config import KvtierConfig, load_config, redact_url
from kvtier.errors import ConfigError


def test_defaults_have_no_tiers():
    cfg = load_config({}, env={})
    assert not cfg.has_host and not cfg.has_disk and not cfg.has_remote


def test_extra_config_values_are_coerced():
    cfg = load_config({"host_cache_gb": "4", "disk_cache_gb": 20, "disk_dir": "/tmp/x",
                       "disk_o_direct": "false", "metrics_port": "9100"}, env={})
    assert cfg.host_cache_gb == 4.0 and cfg.disk_cache_gb == 20.0
    assert cfg.disk_o_direct is False and cfg.metrics_port == 9100


def test_precedence_file_then_aliases_then_env_then_extra(tmp_path, caplog):
    f = tmp_path / "kvtier.toml"
    f.write_text('[kvtier]\nhost_cache_gb = 1\ndisk_cache_gb = 2\ndisk_dir = "/a"\n')
    env = {"KVTIER_CONFIG": str(f), "DYN_KVBM_DISK_CACHE_GB": "3", "KVTIER_HOST_CACHE_GB": "5"}
    with caplog.at_level(logging.WARNING):
        cfg = load_config({"disk_dir": "/b"}, env=env)
    assert (cfg.host_cache_gb, cfg.disk_cache_gb, cfg.disk_dir) == (5.0, 3.0, "/b")
    assert "DYN_KVBM_DISK_CACHE_GB is deprecated" in caplog.text


def test_yaml_file(tmp_path):
    f = tmp_path / "k.yaml"
    f.write_text("host_cache_blocks: 128\nhost_eviction_policy: fifo\n")
    cfg = load_config(env={"KVTIER_CONFIG": str(f)})
    assert cfg.host_cache_blocks == 128 and cfg.host_eviction_policy == "fifo"


@pytest.mark.parametrize("extra, fragment", [
    ({"host_cache_gbs": 1}, "unknown setting 'host_cache_gbs'"),
    ({"host_cache_gb": "lots"}, "host_cache_gb='lots'"),
    ({"host_cache_gb": -1}, "host_cache_gb=-1.0 is not allowed"),
    ({"disk_cache_gb": 1}, "disk_dir is required"),
    ({"disk_admission": "sometimes"}, "disk_admission='sometimes' is not allowed"),
    ({"offload_min_priority": 101}, "use 0..100"),
    ({"metrics_port": 70000}, "metrics_port=70000"),
    ({"max_concurrent_transfers": 0}, "must be > 0"),
    ({"host_eviction_policy": "random"}, "host_eviction_policy='random'"),
    ({"disk_o_direct": "maybe"}, "disk_o_direct='maybe'"),
    ({"remote_url": "localhost:6379"}, "remote_url="),
])
def test_bad_values_name_the_key(extra, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(extra, env={})
    assert fragment in str(err.value)


def test_unknown_env_key_is_rejected():
    with pytest.raises(ConfigError, match="KVTIER_HOST_CACHE"):
        load_config(env={"KVTIER_HOST_CACHE": "1"})


def test_bad_file_is_reported(tmp_path):
    f = tmp_path / "k.toml"
    f.write_text("host_cache_gb = = 1")
    with pytest.raises(ConfigError, match="not valid"):
        load_config(env={"KVTIER_CONFIG": str(f)})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(env={"KVTIER_CONFIG": str(tmp_path / "missing.toml")})


def test_credentials_never_shown():
    url = "redis://:s3cret@127.0.0.1:6379/0"
    assert "s3cret" not in redact_url(url)
    cfg = load_config({"remote_url": url}, env={})
    assert "s3cret" not in str(cfg.describe())
    with pytest.raises(ConfigError) as err:
        load_config({"remote_url": ":s3cret@host"}, env={})
    assert "s3cret" not in str(err.value)
    assert "s3cret" not in redact_url("mooncake://user:s3cret@h:1?metadata=x")
    nested = redact_url("s3://bucket/kv?endpoint=http://user:s3cret@127.0.0.1:9000")
    assert "s3cret" not in nested and nested.endswith("endpoint=http://***@127.0.0.1:9000")


def test_blocks_win_over_gb():
    cfg = KvtierConfig(host_cache_gb=1, host_cache_blocks=10)
    assert cfg.num_blocks(cfg.host_cache_gb, cfg.host_cache_blocks, 1 << 20) == 10
    cfg = KvtierConfig(host_cache_gb=1)
    assert cfg.num_blocks(cfg.host_cache_gb, cfg.host_cache_blocks, 10**6) == 1000


@pytest.mark.parametrize("value", [float("inf"), float("nan"), "inf", "nan", 1e300])
def test_non_finite_or_absurd_sizes_are_rejected(value):
    with pytest.raises(ConfigError, match="host_cache_gb"):
        load_config({"host_cache_gb": value}, env={})


def test_non_table_section_and_binary_file_are_config_errors(tmp_path):
    f = tmp_path / "k.toml"
    f.write_text("kvtier = 3\n")
    with pytest.raises(ConfigError, match="must be a table"):
        load_config(env={"KVTIER_CONFIG": str(f)})
    b = tmp_path / "b.toml"
    b.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(env={"KVTIER_CONFIG": str(b)})


def test_toml_parser_is_tomli_before_python_3_11(tmp_path, monkeypatch):
    """On Python 3.10 (no stdlib tomllib) config.py reads TOML with the ``tomli`` package that
    pyproject declares there. Simulated: the module is executed afresh (under another name, so
    the loaded kvtier.config is untouched) with version_info 3.10 and a stand-in tomli."""
    calls = []
    parser = kvtier.config.tomllib  # the real one, whichever it is here
    tomli = types.ModuleType("tomli")
    tomli.loads = lambda text: calls.append(text) or parser.loads(text)
    monkeypatch.setitem(sys.modules, "tomli", tomli)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # importing it would fail, as on 3.10
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    spec = importlib.util.spec_from_file_location("kvtier_config_py310", kvtier.config.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    monkeypatch.undo()
    assert module.tomllib is tomli
    f = tmp_path / "k.toml"
    f.write_text("[kvtier]\nhost_cache_blocks = 64\n")
    assert module.load_config(env={"KVTIER_CONFIG": str(f)}).host_cache_blocks == 64
    assert calls == [f.read_text()]


def test_toml_parser_is_the_stdlib_one_from_python_3_11():
    if sys.version_info < (3, 11):
        pytest.skip("Python 3.10: tomli (covered above)")
    assert kvtier.config.tomllib is importlib.import_module("tomllib")
