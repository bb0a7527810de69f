"""G4 on S3 or a self-hosted S3-compatible store:
``s3://BUCKET[/PREFIX][?endpoint=http://HOST:PORT][&region=REGION][&threads=N]``.

``endpoint`` names a self-hosted store (SeaweedFS, MinIO, Ceph RGW; path-style addressing),
without it the client talks to AWS. ``PREFIX`` is put before every object key, so several
deployments can share one bucket without seeing each other's blocks. ``threads`` (default 8)
is how many requests of one batch run side by side, on daemon threads of the backend's own.

Credentials come from boto3's standard chain only (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws/credentials`` and config, SSO, instance
roles); a URL carrying credentials (``user:secret@``, ``access_key=...``) is refused, so no
secret can reach a log line or a metrics label through the URL. Client error messages are
scrubbed of the secret key before they are logged. The identity needs GetObject, PutObject,
DeleteObject and ListBucket on the bucket: without ListBucket, AWS answers 403 instead of 404
for an absent object, which kvtier must take for rejected credentials (store down).

One object per block, named ``PREFIX/<namespace>/<block hash>``. Why not packed objects:
a block is then stored, found, evicted (bucket lifecycle rules) and healed on its own; "first
write wins" is one conditional PUT (``If-None-Match: *``, a plain PUT on stores without it:
the bytes of one key are the same block anyway); any subset of a prefix can be read without an
index object that several instances would have to keep consistent; a bad object spoils one
block. Packing was measured on SeaweedFS on loopback (2 shared cores, raw boto3, 8 threads):
1 MiB blocks, per-block objects ~0.05 GB/s put / ~0.12-0.15 GB/s get, 8 blocks per object
~0.06 / ~0.45 GB/s; 64 KiB blocks ~0.01 / ~0.01 GB/s against ~0.04 / ~0.11 GB/s packed 32 to
an object. So packing pays for small blocks and for reads; real-model blocks are 0.5-4 MiB and
per-block objects were kept for the reasons above (``benchmarks/remote.py`` gives the figures).

Every block read back is verified (length, header, checksum) by ``RemoteBackend``; an object
of the wrong size is not even read. A changed, truncated or foreign object is a miss and is
deleted, so the next offload heals the key.

Faults. botocore's connect and read timeouts are kvtier's ``timeout_s`` and its own retries are
off (one attempt): a retry inside the deadline would only turn a quick miss into a timeout, and
``RetryingBackend`` decides when to try again. Requests of a batch that have not started when
the batch's deadline (``timeout_s`` after it began) has passed are not sent. A refused
connection or rejected credentials (403) mark the store down; a timeout marks it unhealthy; a
server error (5xx, e.g. SeaweedFS's "volume not found" for a while after a restart) is a miss
for that block only.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import boto3
import botocore.exceptions as boto_errors
from botocore.config import Config

from kvtier.config import redact_url
from kvtier.errors import ConfigError, StorageError
from kvtier.storage.remote.base import (
    CORRUPT,
    DOWN,
    FAILED,
    FULL,
    MISSING,
    TIMEOUT,
    UNAVAILABLE,
    RemoteBackend,
    _describe,
    register_backend,
)

logger = logging.getLogger(__name__)

_PARAMS = ("endpoint", "region", "threads")
_DEFAULT_THREADS = 8
_MAX_THREADS = 64
_DEFAULT_REGION = "us-east-1"
_RUNNER_THREADS = 4  # DeadlineRunner's default
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Error codes of a store that cannot serve this client at all (credentials, bucket).
_DOWN_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                         "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
                         "NoSuchBucket", "403", "401"})
_FULL_CODES = frozenset({"QuotaExceeded", "InsufficientStorage", "EntityTooLarge",
                         "XMinioStorageFull", "507"})
_HELD_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})


@register_backend
class S3Backend(RemoteBackend):
    scheme = "s3"

    def __init__(self, url: str, *, namespace: str, timeout_s: float) -> None:
        super().__init__(url, namespace=namespace, timeout_s=timeout_s)
        self.url = _shown(url)  # also hides user-info inside the endpoint parameter
        self.bucket, self.prefix, endpoint, region, threads = _parse_url(url, self.url)
        self._key_prefix = f"{self.prefix}/" if self.prefix else ""
        self._conditional_put = True
        self._secrets: tuple[str, ...] = ()
        try:
            session = boto3.session.Session()
            credentials = session.get_credentials()
            if credentials is None:
                raise ConfigError(f"remote_url={self.url!r}: no AWS credentials found; set "
                                  "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                                  "~/.aws/credentials (the URL never carries them)")
            frozen = credentials.get_frozen_credentials()
            self._secrets = tuple(s for s in (frozen.secret_key, frozen.token) if s)
            config = Config(
                connect_timeout=self.timeout_s, read_timeout=self.timeout_s,
                retries={"total_max_attempts": 1},
                # the fan-out threads, plus single-block calls on the deadline threads
                max_pool_connections=threads + _RUNNER_THREADS,
                s3={"addressing_style": "path"} if endpoint else None,
                # kvtier checksums every block itself; a CRC of each body on top costs CPU.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                user_agent_extra="kvtier")
            self._client = session.client("s3", endpoint_url=endpoint,
                                          region_name=region or session.region_name
                                          or _DEFAULT_REGION, config=config)
        except ConfigError:
            raise
        except boto_errors.CredentialRetrievalError as exc:  # e.g. a role service is down
            raise StorageError(f"s3 store {self.url}: AWS credentials could not be fetched: "
                               f"{self._scrub(_describe(exc))}") from None
        except boto_errors.BotoCoreError as exc:
            raise ConfigError(f"remote_url={self.url!r}: AWS client set-up failed: "
                              f"{self._scrub(_describe(exc))}") from None
        self._pool = _Fanout(f"kvtier-s3-{self.bucket}", threads)
        try:
            answer = self._runner.run(self.timeout_s, self._check_bucket)
        except Exception as exc:  # noqa: BLE001 - translated for the caller just below
            answer = self._scrub(_describe(exc))
        if answer is not None:
            if answer is UNAVAILABLE or not isinstance(answer, str):
                answer = f"no answer within {self.timeout_s:.2f} s"
            self._abandon()
            raise StorageError(f"s3 store {self.url} unreachable: {answer}")

    # -- hooks ----------------------------------------------------------------------------

    def _store(self, names: list[str], views: list[memoryview]) -> list[int]:
        return self._outcomes("put", self._put_one, list(zip(names, views)))

    def _fetch(self, names: list[str], views: list[memoryview]) -> list[Any]:
        return self._outcomes("get", self._get_one,
                              [(name, view.nbytes) for name, view in zip(names, views)])

    def _exists(self, names: list[str]) -> list[int]:
        return self._outcomes("head", self._head_one, names, missing=0)

    def _remove(self, names: list[str]) -> None:
        for name in names:
            self._client.delete_object(Bucket=self.bucket, Key=self._key_prefix + name)

    def _probe(self) -> bool:
        return self._check_bucket() is None

    def _close(self) -> None:
        self._pool.close()
        self._client.close()

    # -- one request each -----------------------------------------------------------------

    def _put_one(self, item: tuple[str, memoryview]) -> int:
        name, view = item
        body = bytes(view)  # botocore takes bytes or a file, not a memoryview
        if self._conditional_put:
            try:
                self._client.put_object(Bucket=self.bucket, Key=self._key_prefix + name,
                                        Body=body, IfNoneMatch="*")
                return 0
            except boto_errors.ClientError as exc:
                code = _code(exc)
                if code in _HELD_CODES:
                    return 0  # held already: first write wins
                if code not in ("NotImplemented", "501"):
                    raise
                logger.info("s3 store %s has no conditional PUT; plain PUTs from now on",
                            self.url)
                self._conditional_put = False
        self._client.put_object(Bucket=self.bucket, Key=self._key_prefix + name, Body=body)
        return 0

    def _get_one(self, item: tuple[str, int]) -> Any:
        name, nbytes = item
        reply = self._client.get_object(Bucket=self.bucket, Key=self._key_prefix + name)
        body = reply["Body"]
        try:
            if reply.get("ContentLength") != nbytes:
                return CORRUPT  # not this block: not worth reading
            data = body.read()
        finally:
            body.close()
        return data if len(data) == nbytes else CORRUPT

    def _head_one(self, name: str) -> int:
        self._client.head_object(Bucket=self.bucket, Key=self._key_prefix + name)
        return 1

    def _check_bucket(self) -> str | None:
        """None when the bucket answers with these credentials, else why not."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except boto_errors.ClientError as exc:
            code = _code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                return f"bucket {self.bucket!r} does not exist"
            if code in ("403", "401", "AccessDenied", "SignatureDoesNotMatch",
                        "InvalidAccessKeyId"):
                return f"credentials rejected ({code}) for bucket {self.bucket!r}"
            return f"bucket {self.bucket!r}: {self._scrub(_describe(exc))}"
        except boto_errors.BotoCoreError as exc:
            return self._scrub(_describe(exc))
        return None

    # -- plumbing -------------------------------------------------------------------------

    def _outcomes(self, what: str, fn: Callable[[Any], Any], items: Sequence[Any], *,
                  missing: int = MISSING) -> list:
        """Run ``fn`` on every item, side by side; failures become per-key outcomes and a
        missing object becomes ``missing``."""
        deadline = time.monotonic() + self.timeout_s
        results = self._pool.map(lambda item: self._guarded(fn, item, deadline, missing),
                                 items, deadline + self.timeout_s)
        bad = [r for r in results if r.__class__ is _Failure]
        if bad:
            level = logging.WARNING if any(f.code in (DOWN, TIMEOUT) for f in bad) \
                else logging.DEBUG
            logger.log(level, "s3 store %s: %d of %d %s requests failed, e.g. %s", self.url,
                       len(bad), len(results), what, bad[0].why)
            results = [r.code if r.__class__ is _Failure else r for r in results]
        return results

    def _guarded(self, fn: Callable[[Any], Any], item: Any, deadline: float,
                 missing: int) -> Any:
        if time.monotonic() > deadline:
            return _Failure(TIMEOUT, "batch deadline passed before the request was sent")
        try:
            return fn(item)
        except boto_errors.ClientError as exc:
            code = _code(exc)
            if code in _MISSING_CODES:
                return missing
            if code in _DOWN_CODES:
                return _Failure(DOWN, self._scrub(_describe(exc)))
            if code in _FULL_CODES:
                return _Failure(FULL, code)
            return _Failure(FAILED, self._scrub(_describe(exc)))
        except (boto_errors.ConnectTimeoutError, boto_errors.ReadTimeoutError) as exc:
            return _Failure(TIMEOUT, self._scrub(_describe(exc)))
        except (boto_errors.EndpointConnectionError, boto_errors.ConnectionClosedError,
                boto_errors.NoCredentialsError, boto_errors.PartialCredentialsError,
                boto_errors.CredentialRetrievalError) as exc:
            return _Failure(DOWN, self._scrub(_describe(exc)))
        except Exception as exc:  # noqa: BLE001 - any other client failure: this key fails
            return _Failure(FAILED, self._scrub(_describe(exc)))

    def _abandon(self) -> None:
        self._runner.close()
        self._pool.close()
        if self.drained:
            self._client.close()

    def _scrub(self, text: str) -> str:
        """Client messages do not carry the secret, but be sure before logging them."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _Failure:
    """A failed request: its outcome code and a loggable reason."""

    __slots__ = ("code", "why")

    def __init__(self, code: int, why: str) -> None:
        self.code = code
        self.why = why


class _Batch:
    __slots__ = ("done", "fn", "left", "lock", "results")

    def __init__(self, fn: Callable[[Any], Any], num: int) -> None:
        self.fn = fn
        self.results: list[Any] = [_Failure(TIMEOUT, "no answer")] * num
        self.left = num
        self.lock = threading.Lock()
        self.done = threading.Event()


class _Fanout:
    """Daemon threads running the requests of a batch side by side. Daemon threads, not a
    ``ThreadPoolExecutor``, for the reason ``DeadlineRunner`` gives: a request stuck past its
    socket timeouts must not hold the interpreter at exit."""

    def __init__(self, name: str, num_threads: int) -> None:
        self._name = name
        self._num_threads = num_threads
        self._queue: queue.SimpleQueue[tuple[_Batch, int, Any] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], wait_until: float) -> list:
        """``fn`` of every item; a ``_Failure(TIMEOUT)`` for those not done by ``wait_until``
        (monotonic clock)."""
        num = len(items)
        if num == 1:
            return [fn(items[0])]
        batch = _Batch(fn, num)
        with self._lock:
            if self._closed:
                return [_Failure(DOWN, "client closed")] * num
            for _ in range(min(num, self._num_threads) - len(self._threads)):
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f"{self._name}-{len(self._threads)}")
                thread.start()
                self._threads.append(thread)
        for idx, item in enumerate(items):
            self._queue.put((batch, idx, item))
        batch.done.wait(max(0.0, wait_until - time.monotonic()))
        with batch.lock:
            return list(batch.results)  # a copy: late answers cannot change what we return

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch, idx, item = job
            result = batch.fn(item)  # never raises: the backend turns errors into outcomes
            with batch.lock:
                batch.results[idx] = result
                batch.left -= 1
                if batch.left == 0:
                    batch.done.set()


def _code(exc: boto_errors.ClientError) -> str:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    if code:
        return code
    return str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _shown(url: str) -> str:
    """The URL as logs show it: ``redact_url``, and no user-info in the endpoint either."""
    return re.sub(r"(endpoint=[a-zA-Z][a-zA-Z0-9+.-]*(?:://|%3A%2F%2F))[^/&?#]*@", r"\1***@",
                  redact_url(url), flags=re.IGNORECASE)


def _parse_url(url: str, shown: str) -> tuple[str, str, str | None, str | None, int]:
    """(bucket, key prefix, endpoint, region, threads); ConfigError naming the wrong part."""
    parts = urlsplit(url)
    where = f"remote_url={shown!r}"
    if "@" in parts.netloc or parts.username is not None:
        raise ConfigError(f"{where}: credentials in the URL are not accepted; use the AWS "
                          "credential chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                          "AWS_PROFILE, ~/.aws/credentials)")
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(f"{where}: bucket {bucket!r} is not a valid S3 bucket name (3-63 "
                          "characters: lower-case letters, digits, '.' and '-'), expected "
                          "s3://BUCKET/PREFIX?endpoint=http://HOST:PORT")
    segments = [segment for segment in parts.path.split("/") if segment]
    if any(segment in (".", "..") for segment in segments):
        raise ConfigError(f"{where}: key prefix {parts.path!r} may not contain '.' or '..'")
    if parts.fragment:
        raise ConfigError(f"{where}: a '#' fragment is not allowed")
    params: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _PARAMS:
            if name.lower() in ("access_key", "secret_key", "aws_access_key_id",
                                "aws_secret_access_key", "password", "token"):
                raise ConfigError(f"{where}: credentials in the URL are not accepted; use "
                                  "the AWS credential chain")
            raise ConfigError(f"{where} has unknown parameter {name!r}: s3 URLs accept "
                              f"{', '.join(_PARAMS)}")
        if name in params:
            raise ConfigError(f"{where}: parameter {name!r} is given twice")
        params[name] = value
    endpoint = params.get("endpoint") or None
    if endpoint is not None:
        try:
            ep = urlsplit(endpoint)
            ep.port  # noqa: B018 - parses the port, raising for a bad one
        except ValueError as exc:
            raise ConfigError(f"{where}: endpoint is not a URL: {exc}") from None
        if ep.scheme not in ("http", "https") or not ep.hostname:
            raise ConfigError(f"{where}: endpoint must be http://HOST[:PORT] or "
                              "https://HOST[:PORT]")
        if ep.username is not None:
            raise ConfigError(f"{where}: credentials in the endpoint are not accepted; use "
                              "the AWS credential chain")
        if ep.query or ep.fragment or ep.path not in ("", "/"):
            raise ConfigError(f"{where}: endpoint must be http(s)://HOST[:PORT] only (no "
                              "path or query; put '&' between parameters)")
    region = params.get("region") or None
    if region is not None and not re.fullmatch(r"[a-z0-9-]{1,32}", region):
        raise ConfigError(f"{where}: region {region!r} is not a region name like us-east-1")
    threads = _DEFAULT_THREADS
    if "threads" in params:
        text = params["threads"]
        threads = int(text) if text.isdigit() else 0
        if not 1 <= threads <= _MAX_THREADS:
            raise ConfigError(f"{where}: threads={text!r} is not allowed: a whole number from "
                              f"1 to {_MAX_THREADS}")
    return bucket, "/".join(segments), endpoint, region, threads
