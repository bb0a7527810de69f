"""kvtier's log lines go where the engine's go, once each; the start-up line hides secrets.

The engine here is a stand-in logger configured as vLLM configures its own (one handler with
its format, ``propagate=False``); the real vLLM log is checked by the end-to-end engine test
(``tests/integration/test_vllm_e2e.py``).
"""

from __future__ import annotations

import io
import logging
import uuid

import pytest

from kvtier.logs import ROOT_LOGGER, EngineHandler, follow_engine_logging

FORMAT = "ENGINE %(levelname)s [%(filename)s:%(lineno)d] %(message)s"


def _stream_handler(fmt: str = FORMAT) -> tuple[logging.Handler, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    handler.setLevel(logging.INFO)
    return handler, stream


@pytest.fixture
def kvtier_logger():
    """The ``kvtier`` logger, restored afterwards (other tests capture through the root)."""
    root = logging.getLogger(ROOT_LOGGER)
    saved = (list(root.handlers), root.level, root.propagate)
    root.handlers.clear()
    root.setLevel(logging.NOTSET)
    root.propagate = True
    yield root
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    root.propagate = saved[2]


@pytest.fixture
def engine():
    """An engine logger set up as vLLM sets up ``vllm``: its own handler, no propagation."""
    logger = logging.getLogger(f"engine-{uuid.uuid4().hex}")
    handler, stream = _stream_handler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.stream = stream
    yield logger
    logger.handlers.clear()


@pytest.fixture
def user_root():
    """A handler the user put on the root logger (``logging.basicConfig``)."""
    handler, stream = _stream_handler("ROOT %(message)s")
    logging.getLogger().addHandler(handler)
    yield stream
    logging.getLogger().removeHandler(handler)


def test_lines_reach_the_engine_handler_in_its_format(kvtier_logger, engine, user_root):
    assert follow_engine_logging(engine.name)
    logging.getLogger("kvtier.some.module").info("tier ready: %d blocks", 12)
    logging.getLogger("kvtier.some.module").debug("not at INFO")
    lines = engine.stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ENGINE INFO [test_logs.py:")
    assert lines[0].endswith("] tier ready: 12 blocks")
    assert kvtier_logger.level == logging.INFO
    assert user_root.getvalue() == ""  # not a second time through the root


def test_called_again_changes_nothing(kvtier_logger, engine, user_root):
    assert follow_engine_logging(engine.name)
    # Every connector instance calls it (scheduler and worker in one process, a restart).
    assert not follow_engine_logging(engine.name)
    assert not follow_engine_logging(engine.name)
    assert len(kvtier_logger.handlers) == 1
    logging.getLogger("kvtier.x").warning("once")
    assert engine.stream.getvalue().count("once") == 1
    assert user_root.getvalue() == ""


def test_user_configured_kvtier_logging_is_respected(kvtier_logger, engine, user_root):
    own, stream = _stream_handler("MINE %(message)s")
    kvtier_logger.addHandler(own)
    assert not follow_engine_logging(engine.name)
    assert kvtier_logger.handlers == [own] and kvtier_logger.propagate
    logging.getLogger("kvtier.x").warning("mine")
    assert stream.getvalue() == "MINE mine\n"
    assert engine.stream.getvalue() == ""


def test_engine_that_configured_no_logging_leaves_kvtier_alone(kvtier_logger, user_root):
    """vLLM with VLLM_CONFIGURE_LOGGING=0: its logger has no handler; kvtier's records keep
    propagating to whatever the user set up."""
    bare = logging.getLogger(f"engine-{uuid.uuid4().hex}")
    assert not follow_engine_logging(bare.name)
    assert kvtier_logger.handlers == [] and kvtier_logger.propagate
    logging.getLogger("kvtier.x").warning("to the root")
    assert user_root.getvalue() == "ROOT to the root\n"


def test_a_level_the_user_set_is_kept(kvtier_logger, engine):
    kvtier_logger.setLevel(logging.WARNING)
    assert follow_engine_logging(engine.name)
    logging.getLogger("kvtier.x").info("hidden")
    logging.getLogger("kvtier.x").warning("shown")
    text = engine.stream.getvalue()
    assert "shown" in text and "hidden" not in text
    assert kvtier_logger.level == logging.WARNING


def test_engine_reconfigured_later_is_followed(kvtier_logger, engine):
    """vLLM re-applies its logging config (dictConfig replaces the handler objects)."""
    assert follow_engine_logging(engine.name)
    engine.handlers.clear()
    handler, stream = _stream_handler("NEW %(message)s")
    engine.addHandler(handler)
    logging.getLogger("kvtier.x").info("after")
    assert stream.getvalue() == "NEW after\n"
    assert isinstance(kvtier_logger.handlers[0], EngineHandler)


# -- the start-up line ----------------------------------------------------------------------


@pytest.mark.parametrize("url, shown", [
    ("redis://:Sup3r-Secret@10.0.0.5:6379/0", "redis://***@10.0.0.5:6379/0"),
    ("redis://kv:Sup3r-Secret@10.0.0.5:6379/0", "redis://***@10.0.0.5:6379/0"),
    ("mooncake://10.0.0.5:50051?metadata=http://10.0.0.5:8080/metadata&password=Sup3r-Secret",
     "mooncake://10.0.0.5:50051?metadata=http://10.0.0.5:8080/metadata&password=***"),
])
def test_startup_summary_names_tiers_and_sizes_and_redacts(url, shown):
    from kvtier.config import load_config
    from kvtier.connectors.vllm import startup_summary
    from kvtier.protocol import TierLayout

    config = load_config({"host_cache_gb": 2, "disk_cache_gb": 4, "disk_dir": "/cache",
                          "remote_url": url, "hash_mode": "sha256", "onboard_mode": "always"},
                         env={})
    line = startup_summary(config, TierLayout(500, 1000, 2_000_000), 32, world_size=2)
    assert "Sup3r-Secret" not in line
    assert (f"kvtier: tiers G2 host 2.00 GB (500 blocks) eviction=dueling, G3 disk 4.00 GB (1000 "
            f"blocks) in /cache eviction=dueling, G4 remote {shown}; hash_mode=sha256, "
            "onboard_mode=always; block 32 tokens, 4000000 B over 2 rank(s)") == line


def test_startup_summary_of_a_remote_only_instance():
    from kvtier.config import load_config
    from kvtier.connectors.vllm import startup_summary
    from kvtier.protocol import TierLayout

    config = load_config({"remote_url": "redis://127.0.0.1:6379/0"}, env={})
    line = startup_summary(config, TierLayout(264, 0, 1_000_000), 16)
    assert line.startswith("kvtier: tiers G2 host staging (G3/G4 transfers only, no cache) "
                           "0.26 GB (264 blocks), G4 remote redis://127.0.0.1:6379/0; "
                           "hash_mode=xxh3, onboard_mode=auto")
    assert "G3" not in line.split(";")[0].replace("G3/G4", "")


@pytest.mark.parametrize("num_blocks, shown", [(7629, "1.00 GB"), (100, "0.013 GB"),
                                               (4, "0.00052 GB"), (30518, "4.00 GB")])
def test_startup_summary_sizes_read_well(num_blocks, shown):
    from kvtier.config import load_config
    from kvtier.connectors.vllm import startup_summary
    from kvtier.protocol import TierLayout

    config = load_config({"host_cache_blocks": num_blocks}, env={})
    line = startup_summary(config, TierLayout(num_blocks, 0, 131072), 32)
    assert line.startswith(f"kvtier: tiers G2 host {shown} ({num_blocks} blocks) eviction=dueling; "), line
