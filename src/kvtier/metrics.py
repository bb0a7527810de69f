"""Prometheus metrics, kept by the leader (workers report their figures to it).

Every instance owns its own registry, so several engines (or tests) in one process never
share counters; ``serve(port)`` exposes it over HTTP when ``metrics_port`` is set.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kvtier.tiers import Tier

logger = logging.getLogger(__name__)

# Direction names used in worker reports and metric labels.
DIRECTIONS = ("g1_to_g2", "g2_to_g1", "g2_to_g3", "g3_to_g2", "g2_to_g4", "g4_to_g2")
_LATENCY_BUCKETS = (1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


class KvtierMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.blocks = Counter("kvtier_transfer_blocks", "Blocks moved, by direction",
                              ["direction"], registry=r)
        self.bytes = Counter("kvtier_transfer_bytes", "Bytes moved, by direction",
                             ["direction"], registry=r)
        self.latency = Histogram("kvtier_transfer_seconds", "Transfer batch latency",
                                 ["direction"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queried_blocks = Counter("kvtier_queried_blocks",
                                      "Blocks looked up beyond the device prefix", registry=r)
        self.matched_blocks = Counter("kvtier_matched_blocks", "Blocks onboarded intact, by tier",
                                      ["tier"], registry=r)
        self.matched_tokens = Counter("kvtier_matched_tokens", "Tokens onboarded intact, by tier",
                                      ["tier"], registry=r)
        self.requested_tokens = Counter("kvtier_requested_tokens",
                                        "Prompt tokens of requests looked up", registry=r)
        self.skipped_onboards = Counter("kvtier_onboard_skipped_blocks",
                                        "Matched blocks recomputed because loading was slower",
                                        registry=r)
        self.dropped_offloads = Counter("kvtier_dropped_offloads",
                                        "Offloads dropped (target full or refused), by tier",
                                        ["tier"], registry=r)
        self.load_errors = Counter("kvtier_load_errors", "Blocks that failed to onboard",
                                   registry=r)
        self.checksum_failures = Counter("kvtier_checksum_failures",
                                         "Blocks whose stored bytes failed verification",
                                         registry=r)
        self.unkeyable_requests = Counter("kvtier_unkeyable_requests",
                                          "Requests served without kvtier because their KV "
                                          "cannot be keyed safely, by reason", ["reason"],
                                          registry=r)
        self.rank_timeouts = Counter("kvtier_rank_timeouts",
                                     "Operations failed because a rank did not report them "
                                     "within the deadline after the others, by kind",
                                     ["kind"], registry=r)
        self.queue_depth = Gauge("kvtier_inflight_transfers", "Blocks in flight, by kind",
                                 ["kind"], registry=r)
        self.tier_blocks = Gauge("kvtier_tier_used_blocks", "Registered blocks held, by tier",
                                 ["tier"], registry=r)

        self.remote_events = Counter("kvtier_remote_events",
                                     "Remote tier events: errors, timeouts, unavailable (blocks "
                                     "asked while down), reconnects, probe_timeouts, ...",
                                     ["event"], registry=r)
        self.remote_healthy = Gauge("kvtier_remote_healthy", "1 while the remote tier answers",
                                    registry=r)

    def record_remote_events(self, deltas: dict[str, int]) -> None:
        for name, delta in deltas.items():
            if delta > 0:
                self.remote_events.labels(name).inc(delta)
        # Remote blocks that failed verification count with the other tiers' failures.
        self.checksum_failures.inc(max(deltas.get("checksum_failures", 0), 0))

    def record_transfer(self, direction: str, num_blocks: int, num_bytes: int,
                        seconds: float) -> None:
        self.blocks.labels(direction).inc(num_blocks)
        self.bytes.labels(direction).inc(num_bytes)
        if seconds > 0:
            self.latency.labels(direction).observe(seconds)

    def record_match(self, tier: Tier, num_blocks: int, block_tokens: int) -> None:
        self.matched_blocks.labels(tier.name).inc(num_blocks)
        self.matched_tokens.labels(tier.name).inc(num_blocks * block_tokens)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a counter or gauge sample (0 when never set); for reports/tests."""
        value = self.registry.get_sample_value(name, labels or None)
        if value is None:
            value = self.registry.get_sample_value(name + "_total", labels or None)
        return value or 0.0

    def hit_rate(self, tier: Tier) -> float:
        queried = self.value("kvtier_queried_blocks")
        return self.value("kvtier_matched_blocks", tier=tier.name) / queried if queried else 0.0

    def serve(self, port: int) -> None:
        """Expose the metrics on 127.0.0.1-independent ``port`` (all interfaces, as Prometheus
        scrapes from outside); failures are logged, never fatal to the engine."""
        try:
            start_http_server(port, registry=self.registry)
            logger.info("kvtier metrics on :%d/metrics", port)
        except OSError as exc:
            logger.warning("kvtier metrics not served on port %d: %s", port, exc)
