"""Shared fixtures: a tiny local Llama (no download); GPU tests skip without CUDA.

``need.py`` (next to this file, on ``sys.path`` from here) is the one place that decides whether
a missing server, package or data file skips a test or, with ``REQUIRE_TEST_SERVERS=1`` (CI),
fails it: ``from need import need_servers, need_module, need_file, data_dir``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from kvtier.cli.tiny_model import make_tiny_llama

    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
