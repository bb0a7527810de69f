"""G4: shared remote stores (Mooncake Store, Redis, S3) behind one batch interface.

    ns = make_namespace(model_id, geometry_fingerprint, rank)
    tier = RetryingBackend(cfg.remote_url, namespace=ns, timeout_s=cfg.remote_timeout_ms / 1000)
    tier.batch_put(keys, blocks)            # G2 -> G4, blocks carry the block_format header
    tier.batch_get_into(keys, buffers)      # G4 -> G2, verified; False = miss, recompute
    tier.maybe_reconnect()                  # now and then, while not tier.healthy

``make_backend(url, namespace=..., timeout_s=...)`` opens one store directly (raises
``StorageError`` when unreachable). Backends register themselves by URL scheme; a new store is a
new module ``kvtier/storage/remote/<scheme>.py`` (found by its scheme) or a
``kvtier.remote_backends`` entry point. The client libraries are imported only when a URL of
their scheme is opened. ``redis+cluster://`` (a Redis Cluster, ``redis_cluster.py``) is
registered here, since its scheme names no module.
"""

from kvtier.errors import ConfigError
from kvtier.storage.remote.base import (
                                        STAT_NAMES,
                                        Namespace,
                                        RemoteBackend,
                                        backend_class,
                                        make_backend,
                                        make_namespace,
                                        parse_namespace,
                                        register_backend,
                                        remote_key,
)
from kvtier.storage.remote.retrying import RETRY_STAT_NAMES, RetryingBackend


class _RedisClusterLoader:
    """Stands for ``RedisClusterBackend`` in the registry, so that redis-py is imported only
    when a ``redis+cluster://`` URL is opened: calling it builds the real backend."""

    scheme = "redis+cluster"

    def __new__(cls, url: str, *, namespace: str, timeout_s: float) -> RemoteBackend:
        try:
            from kvtier.storage.remote.redis_cluster import RedisClusterBackend
        except ModuleNotFoundError as exc:
            if exc.name != "redis" and not (exc.name or "").startswith("redis."):
                raise
            raise ConfigError(f"remote scheme {cls.scheme!r} needs the Python package "
                              "'redis': pip install 'kvtier[redis]'") from exc
        return RedisClusterBackend(url, namespace=namespace, timeout_s=timeout_s)


register_backend(_RedisClusterLoader)  # type: ignore[arg-type] - builds a RemoteBackend

__all__ = [
                                        "RETRY_STAT_NAMES",
                                        "STAT_NAMES",
                                        "Namespace",
                                        "RemoteBackend",
                                        "RetryingBackend",
                                        "backend_class",
                                        "make_backend",
                                        "make_namespace",
                                        "parse_namespace",
                                        "register_backend",
                                        "remote_key",
]
