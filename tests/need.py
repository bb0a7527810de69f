"""What a test or benchmark needs and may lack: a server binary, a Python package, a data file.

Something missing skips the test, or FAILS it when ``REQUIRE_TEST_SERVERS=1`` (CI: ``.ci/run``),
so that CI never passes by skipping. This is the one implementation: tests call ``need_*``
(``tests/conftest.py`` puts this directory and ``tests/integration``, home of ``servers.py``, on
``sys.path``); benchmarks call ``require_or_note`` (no pytest needed).

The shared trace data lives beside the repository (``../shared/data``); ``TEST_DATA_DIR``
overrides it (not a ``KVTIER_*`` name: kvtier rejects unknown ``KVTIER_*`` settings).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

REQUIRE_ENV = "REQUIRE_TEST_SERVERS"
DATA_ENV = "TEST_DATA_DIR"
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

if str(TESTS / "integration") not in sys.path:
    sys.path.insert(0, str(TESTS / "integration"))


def required() -> bool:
    """True when a missing server, package or data file must fail instead of skip."""
    return os.environ.get(REQUIRE_ENV) == "1"


def data_dir() -> Path:
    """The shared trace data: ``$TEST_DATA_DIR``, else ``shared/data`` beside the repository
    (or beside a directory above it), else beside the repository this one was cloned from (a
    clean clone elsewhere, as CI makes). The first candidate when none exists, so the
    message names where it was looked for."""
    override = os.environ.get(DATA_ENV)
    if override:
        return Path(override)
    candidates = [parent / "shared" / "data" for parent in ROOT.parents]
    origin = _clone_origin()
    if origin is not None:
        candidates.insert(1, origin.parent / "shared" / "data")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return candidates[0]


def _clone_origin() -> Path | None:
    """The local repository this checkout was cloned from, if it was cloned from a path."""
    import subprocess

    try:
        url = subprocess.run(["git", "-C", str(ROOT), "remote", "get-url", "origin"],
                             check=False, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    url = url.removeprefix("file://")
    return Path(url).resolve() if url and Path(url).is_dir() else None


# -- what is missing (None when nothing) --------------------------------------------------------

def missing_servers(kind: str) -> str | None:
    """Why a ``kind`` ("redis" or "mooncake") server cannot be started here, or None."""
    from servers import missing_binaries

    missing = missing_binaries(kind)
    return f"{kind} server not installed: {', '.join(missing)}" if missing else None


def missing_module(name: str) -> str | None:
    """Why the Python package ``name`` cannot be imported, or None."""
    try:
        importlib.import_module(name)
    except ImportError as exc:
        return f"Python package {name!r} not importable: {exc}"
    return None


def missing_file(path: Path) -> str | None:
    """Why the data file ``path`` cannot be read, or None."""
    if Path(path).is_file():
        return None
    return f"data file not found: {path} (set {DATA_ENV} to the directory holding it)"


# -- tests -------------------------------------------------------------------------------------

def need(missing: str | None) -> None:
    """In a test or fixture: skip with ``missing`` as the reason, or fail under
    ``REQUIRE_TEST_SERVERS=1``; nothing when ``missing`` is None or empty."""
    __tracebackhide__ = True  # pytest reports the caller's line, not this one
    if not missing:
        return
    import pytest

    if required():
        pytest.fail(f"{missing} ({REQUIRE_ENV}=1: a missing requirement fails)", pytrace=False)
    pytest.skip(missing)


def need_servers(kind: str) -> None:
    __tracebackhide__ = True
    need(missing_servers(kind))


def need_module(name: str) -> ModuleType:
    __tracebackhide__ = True
    need(missing_module(name))
    return importlib.import_module(name)


def need_file(path: Path) -> Path:
    __tracebackhide__ = True
    need(missing_file(path))
    return Path(path)


# -- benchmarks --------------------------------------------------------------------------------

def require_or_note(missing: list[str | None], part: str) -> bool:
    """In a benchmark, before running ``part`` (e.g. "faults.py: the G4 scenarios"): True when
    nothing in ``missing`` (reasons from ``missing_*``) is set. Otherwise, under
    ``REQUIRE_TEST_SERVERS=1``, exit with status 1 naming what is missing; without it, say on
    stderr that ``part`` is skipped and why, and return False."""
    reasons = "; ".join(m for m in missing if m)
    if not reasons:
        return True
    if required():
        print(f"error: {part} cannot run: {reasons} ({REQUIRE_ENV}=1: a missing requirement "
              "fails)", file=sys.stderr)
        sys.exit(1)
    print(f"SKIPPED {part}: {reasons}", file=sys.stderr)
    return False
