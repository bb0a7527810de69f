"""How kvtier's loggers get their handler: inside an engine, the engine's own.

kvtier logs through ``logging.getLogger(__name__)`` and configures no handler of its own. An
engine usually configures handlers for its own logger only: vLLM gives its ``vllm`` logger a
handler with its format and ``propagate=False`` (``vllm/logger.py``), so a plugin's INFO lines
reach no handler at all and its warnings reach Python's last-resort handler, unformatted.

``follow_engine_logging("vllm")`` makes the ``kvtier`` logger hand its records to whatever
handlers the engine's logger has when a record is emitted (so a later reconfiguration of the
engine's logging is followed too), at the engine logger's level (vLLM: ``VLLM_LOGGING_LEVEL``,
INFO by default; INFO when it has none), without propagating further, as the engine's own
lines do. The engine adapter calls it when it is constructed, in every process that runs
kvtier code.

It changes nothing when that would override a choice somebody made:
- the ``kvtier`` logger already has a handler (the user configured it, or an earlier call);
- the engine's logger has no handler (vLLM with ``VLLM_CONFIGURE_LOGGING=0``, or a process
  where the engine has not configured logging yet): kvtier's records then propagate to the
  root logger as usual, to whatever the user set up there.
A level the user set on ``kvtier`` is kept.
"""

from __future__ import annotations

import logging

ROOT_LOGGER = "kvtier"


class EngineHandler(logging.Handler):
    """Hands each record to the handlers the engine's logger has at that moment."""

    def __init__(self, engine_logger: logging.Logger) -> None:
        super().__init__()
        self.engine_logger = engine_logger

    def emit(self, record: logging.LogRecord) -> None:
        for handler in self.engine_logger.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def follow_engine_logging(engine_logger_name: str) -> bool:
    """Route the ``kvtier`` logger's records to the engine logger's handlers; True when it
    did so now, False when it left logging as it was (see the module docstring)."""
    root = logging.getLogger(ROOT_LOGGER)
    engine = logging.getLogger(engine_logger_name)
    if root.handlers or not engine.handlers:
        return False
    root.addHandler(EngineHandler(engine))
    if root.level == logging.NOTSET:
        root.setLevel(engine.level or logging.INFO)
    # Like the engine's own logger: a root handler the user added would print every line twice.
    root.propagate = False
    return True
