"""Test only: kvtier's vLLM connector with a fault armed in one rank's worker process.

``kvtier.storage.faults`` is armed by an explicit call in the process that wants it; with
tensor parallelism vLLM runs every rank's worker in a process of its own, where a job's own
call never runs. This subclass makes that call in the worker whose rank is
``$SLOW_RANK_CONNECTOR_RANK``, with the rules of ``$SLOW_RANK_CONNECTOR_FAULTS``
(``faults.arm_spec`` syntax), and writes what fired there to ``$SLOW_RANK_CONNECTOR_REPORT``
(JSON) as it changes. Nothing else differs from ``KvtierConnector``. The job names it with
``{"name": "SlowRankConnector", "module": "slow_rank_connector"}`` and this directory on
``PYTHONPATH`` (inherited by vLLM's worker processes).
"""

from __future__ import annotations

import json
import os

from kvtier.connectors.vllm import KvtierConnector
from kvtier.storage import faults

RANK_ENV = "SLOW_RANK_CONNECTOR_RANK"
FAULTS_ENV = "SLOW_RANK_CONNECTOR_FAULTS"
REPORT_ENV = "SLOW_RANK_CONNECTOR_REPORT"


class SlowRankConnector(KvtierConnector):
    def __init__(self, vllm_config, role, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._fired = -1
        self._armed = (self.worker is not None
                       and self.worker.rank == int(os.environ.get(RANK_ENV, "-1")))
        if self._armed:
            faults.arm_spec(os.environ[FAULTS_ENV])
            self._write_report()

    def get_finished(self, finished_req_ids):
        result = super().get_finished(finished_req_ids)
        if self._armed and faults.fired() != self._fired:
            self._write_report()
        return result

    def _write_report(self) -> None:
        self._fired = faults.fired()
        path = os.environ.get(REPORT_ENV)
        if path:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump({"rank": self.worker.rank, "pid": os.getpid(),
                           "fired": self._fired}, f)
            os.replace(tmp, path)
