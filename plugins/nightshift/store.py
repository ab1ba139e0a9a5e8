"""The artifact store: where every artifact lives, a local folder or an S3 bucket prefix.

``NIGHTSHIFT_ARTIFACT_ROOT`` is either a local folder (the default, ``make run``) or an
``s3://bucket/prefix`` URI (the cluster profile: Celery workers that share no folder).
Code reads and writes files under :attr:`Store.local_root` as before; what changes with
an object store is that the local root is only a *working copy*:

* :meth:`Store.publish` uploads a file or a folder (only what changed) and returns its URI;
  every object carries the sha256 of its bytes (``x-amz-meta-sha256``).
* :meth:`Store.fetch` downloads a URI (file or folder) into the working copy and returns
  the local path. A local file whose sha256 equals the object's is used as is (the
  working copy is a cache keyed by content digest); a download is written to a temporary
  name, its sha256 checked against the object's, then renamed into place, so a torn or
  corrupt transfer is never read as valid.
* :meth:`Store.to_uri` / :meth:`Store.to_local` map between the two without I/O. Tasks
  hand each other URIs (XCom, registry tags), never working-copy paths.
* Small shared state (promotion history, deployment state, drift timeline, cooldown
  record) goes through :meth:`read_json` / :meth:`write_json` (whole-object, atomic) and
  :meth:`append_record` / :meth:`read_records` (an idempotent event log: one object per
  event on S3, one JSON line per event locally).
* :meth:`lock`: an exclusive lock that survives a killed holder. Locally a ``flock``
  (the kernel releases it); on S3 a lease object created with ``If-None-Match: *``,
  renewed by its holder with ``If-Match`` and taken over (conditional delete) only after
  its lease expired.

With a local root every method is the identity or a plain file operation, so the
embedded profile behaves exactly as it did. No Airflow here: credentials come from the
environment (``AWS_ACCESS_KEY_ID`` & co., ``NIGHTSHIFT_S3_ENDPOINT_URL``) or from the
operator layer, which resolves an Airflow connection into :class:`S3Options`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from nightshift.artifacts import sha256_file
from nightshift.errors import NightshiftError

log = logging.getLogger(__name__)

#: User-metadata key of every object this module writes: the sha256 of its bytes.
SHA_META = "sha256"
#: Suffix of the folder that holds one object per record of an event log on S3.
RECORDS_SUFFIX = ".d"


class StoreError(NightshiftError):
    """The artifact store could not be read or written (unreachable, denied, full, corrupt).

    The message names the URI. Retryable unless access was denied or the bucket is missing
    (configuration), see :attr:`retryable`.
    """

    retryable = True

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class StoreLockTimeout(StoreError):
    """Another holder kept a store lock for longer than the timeout."""


def _is_temp(name: str) -> bool:
    """Temporary names of the atomic writers (``.x.abc.tmp``, ``.x.old``) are never published."""
    return name.startswith(".") and (name.endswith(".tmp") or name.endswith(".old") or ".tmp" in name)


def _in_temp(rel: str) -> bool:
    """``rel`` is, or is inside, a temporary file or folder of an atomic writer."""
    return any(_is_temp(part) for part in rel.split("/"))


@dataclass(frozen=True)
class S3Options:
    """How to reach the bucket: endpoint (``None``: AWS), region, keys (``None``: boto3's chain)."""

    endpoint_url: str | None = None
    region_name: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None

    @classmethod
    def from_env(cls) -> "S3Options":
        env = os.environ
        return cls(endpoint_url=env.get("NIGHTSHIFT_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3")
                   or env.get("AWS_ENDPOINT_URL") or None,
                   region_name=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
                   access_key=env.get("AWS_ACCESS_KEY_ID") or None, secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
                   session_token=env.get("AWS_SESSION_TOKEN") or None)


def is_remote(root: str | os.PathLike) -> bool:
    return str(root).startswith("s3://")


def open_store(root: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
               s3: S3Options | None = None) -> "Store":
    """The store of an artifact root: :class:`S3Store` for ``s3://bucket/prefix``, else :class:`LocalStore`.

    :param cache_dir: where an S3 store keeps its working copy (required for ``s3://``).
    :raises StoreError: another scheme (only local folders and ``s3://`` are supported), or no cache_dir.
    """
    text = str(root)
    if is_remote(text):
        if cache_dir is None:
            raise StoreError(f"artifact root {text}: an object-store root needs a local cache folder", retryable=False)
        return S3Store(text, cache_dir=Path(cache_dir), options=s3 or S3Options.from_env())
    if "://" in text and not text.startswith("file://"):
        raise StoreError(f"artifact root {text!r}: only a local folder or s3://bucket/prefix is supported "
                         "(set NIGHTSHIFT_ARTIFACT_ROOT)", retryable=False)
    return LocalStore(Path(text.removeprefix("file://")))


class Store:
    """Base: the working copy under :attr:`local_root`, the canonical form :attr:`uri`."""

    uri: str
    local_root: Path
    remote: bool = False

    # -- mapping (no I/O) --------------------------------------------------------------------------
    def rel(self, uri_or_path: str | os.PathLike) -> str | None:
        """The key of ``uri_or_path`` relative to the root (``runs/x/y/model/model.onnx``), or None
        when it is not under this store (an outside path or URI)."""
        text = str(uri_or_path)
        if text.rstrip("/") == self.uri.rstrip("/"):
            return ""
        if text.startswith(self.uri.rstrip("/") + "/"):
            return text[len(self.uri.rstrip("/")) + 1:]
        if "://" in text and not text.startswith("file://"):
            return None
        try:
            p = Path(text.removeprefix("file://"))
            if not p.is_absolute():
                return None
            r = p.resolve().relative_to(self.local_root.resolve()).as_posix()
            return "" if r == "." else r
        except ValueError:
            return None

    def to_uri(self, uri_or_path: str | os.PathLike) -> str:
        """The URI other workers can read (a path outside the store comes back unchanged)."""
        rel = self.rel(uri_or_path)
        return str(uri_or_path) if rel is None else f"{self.uri.rstrip('/')}/{rel}" if rel else self.uri

    def to_local(self, uri_or_path: str | os.PathLike) -> Path:
        """Where ``uri_or_path`` is (or would be) in this worker's working copy."""
        rel = self.rel(uri_or_path)
        if rel is None:
            return Path(str(uri_or_path).removeprefix("file://"))
        return self.local_root / rel if rel else self.local_root

    # -- transfer ------------------------------------------------------------------------------------
    def fetch(self, uri_or_path: str | os.PathLike, *, required: bool = True) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def publish(self, path: str | os.PathLike) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- small shared state -------------------------------------------------------------------------
    def read_json(self, rel: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def write_json(self, rel: str, obj: Any) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def append_record(self, rel: str, record: dict[str, Any], *, key: str | None = None) -> bool:  # pragma: no cover
        raise NotImplementedError

    def read_records(self, rel: str, *, limit: int | None = None) -> list[dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError

    def lock(self, rel: str, *, timeout_s: float, purpose: str = "", what: str = "the lock", hint: str = "",
             error: type[Exception] | None = None, on_wait: Any = None) -> contextlib.AbstractContextManager:
        raise NotImplementedError  # pragma: no cover - abstract

    def exists(self, rel: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def fetch_file(self, rel: str) -> Path | None:  # pragma: no cover - abstract
        """The one file ``rel`` in the working copy (downloaded, verified), or None when there is no
        such file (a folder is never downloaded)."""
        raise NotImplementedError

    def children(self, rel: str) -> list[str]:  # pragma: no cover - abstract
        """The names of the folders right under ``rel``."""
        raise NotImplementedError

    def files(self, rel: str) -> set[str]:  # pragma: no cover - abstract
        """Every file under ``rel``, as keys relative to the root."""
        raise NotImplementedError

    def delete(self, rel: str) -> None:  # pragma: no cover - abstract
        """Remove the file ``rel`` (here and in the working copy); a missing one is not an error."""
        raise NotImplementedError


def as_store(root: "str | os.PathLike | Store") -> "Store":
    """``root`` as a :class:`Store`: a store as is, a local folder as its :class:`LocalStore`.

    :raises StoreError: an ``s3://`` root given as a string: pass its store
        (``Settings.store()``), which knows the working copy and the credentials.
    """
    if isinstance(root, Store):
        return root
    if is_remote(root):
        raise StoreError(f"{root}: an object-store root must be passed as its Store (Settings.store()), "
                         "not as a string", retryable=False)
    return open_store(root)


# =========================================================================== local folder


class LocalStore(Store):
    """The artifact root is a folder every task can read: every transfer is the identity."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.local_root = Path(root)
        self.uri = str(self.local_root)

    def to_uri(self, uri_or_path: str | os.PathLike) -> str:
        return str(uri_or_path)

    def fetch(self, uri_or_path: str | os.PathLike, *, required: bool = True) -> Path:
        p = self.to_local(uri_or_path)
        if required and not p.exists():
            raise StoreError(f"{p} does not exist in the artifact store", retryable=False)
        return p

    def publish(self, path: str | os.PathLike) -> str:
        return str(path)

    def exists(self, rel: str) -> bool:
        return (self.local_root / rel).exists()

    def fetch_file(self, rel: str) -> Path | None:
        p = self.local_root / rel
        return p if p.is_file() else None

    def children(self, rel: str) -> list[str]:
        d = self.local_root / rel
        return sorted(c.name for c in d.iterdir() if c.is_dir()) if d.is_dir() else []

    def files(self, rel: str) -> set[str]:
        d = self.local_root / rel
        if not d.is_dir():
            return set()
        return {f.relative_to(self.local_root).as_posix() for f in d.rglob("*") if f.is_file()}

    def delete(self, rel: str) -> None:
        (self.local_root / rel).unlink(missing_ok=True)

    def read_json(self, rel: str) -> Any:
        p = self.local_root / rel
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise StoreError(f"{p} is not valid JSON ({exc})", retryable=False) from exc
        except OSError as exc:
            raise StoreError(f"{p} cannot be read ({exc})", retryable=False) from exc

    def write_json(self, rel: str, obj: Any) -> str:
        from nightshift.artifacts import atomic_write_json

        return str(atomic_write_json(self.local_root / rel, obj))

    def append_record(self, rel: str, record: dict[str, Any], *, key: str | None = None) -> bool:
        """Append one JSON line (with ``key`` as its field ``key``), once per ``key`` (a record whose key is there is not written again),
        under an exclusive ``flock`` of the file; the line is one ``write``. True when written."""
        import fcntl

        from nightshift.artifacts import json_safe

        if key is not None:
            record = {**record, "key": key}
        path = self.local_root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(json_safe(record), sort_keys=True) + "\n").encode("utf-8")
        with open(path, "ab+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                if key is not None:
                    f.seek(0)
                    for raw in f:
                        try:
                            if json.loads(raw).get("key") == key:
                                return False
                        except ValueError:  # a torn line (writer killed): not this record
                            continue
                end = f.seek(0, os.SEEK_END)
                if end:  # a torn last line without its newline must not swallow this record
                    f.seek(end - 1)
                    if f.read(1) != b"\n":
                        line = b"\n" + line
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return True

    def read_records(self, rel: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        """The records of a JSON Lines file in file order (the last ``limit`` of them); a torn line is skipped."""
        p = self.local_root / rel
        if not p.is_file():
            return []
        out = []
        with open(p, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        if limit is not None:
            return out[-limit:] if limit > 0 else []
        return out

    def lock(self, rel: str, *, timeout_s: float, purpose: str = "", what: str = "the lock", hint: str = "",
             error: type[Exception] | None = None, on_wait: Any = None) -> contextlib.AbstractContextManager:
        from nightshift.locks import LockTimeout, file_lock

        return file_lock(self.local_root / rel, timeout_s=timeout_s, purpose=purpose, what=what, hint=hint,
                         error=error or LockTimeout, on_wait=on_wait)


# =========================================================================== S3


class S3Store(Store):
    """The artifact root is ``s3://bucket/prefix``; :attr:`local_root` is this worker's working copy
    (``<cache_dir>/<bucket>/<prefix>``), a cache verified against each object's sha256."""

    remote = True
    #: Lease of a store lock; its holder renews it every third of that.
    LEASE_S = 30.0

    def __init__(self, root: str, *, cache_dir: Path, options: S3Options) -> None:
        bucket, _, prefix = root[len("s3://"):].partition("/")
        if not bucket:
            raise StoreError(f"artifact root {root!r}: no bucket (expected s3://bucket/prefix)", retryable=False)
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.local_root = Path(cache_dir) / bucket / self.prefix if self.prefix else Path(cache_dir) / bucket
        self.options = options
        self._client_lock = threading.Lock()
        self._client_obj: Any = None

    # -- plumbing --------------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        with self._client_lock:
            if self._client_obj is None:
                import boto3
                from botocore.config import Config

                o = self.options
                self._client_obj = boto3.client(
                    "s3", endpoint_url=o.endpoint_url, region_name=o.region_name, aws_access_key_id=o.access_key,
                    aws_secret_access_key=o.secret_key, aws_session_token=o.session_token,
                    config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5,
                                  read_timeout=60, s3={"addressing_style": "path"}))
            return self._client_obj

    def key(self, rel: str) -> str:
        rel = rel.strip("/")
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _rel_of_key(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    def _error(self, exc: Exception, rel: str, doing: str) -> StoreError:
        uri = f"s3://{self.bucket}/{self.key(rel)}"
        code = ""
        resp = getattr(exc, "response", None)
        if isinstance(resp, dict):
            code = str(resp.get("Error", {}).get("Code", ""))
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StoreError(f"artifact store: access denied {doing} {uri} ({code}); check the credentials "
                              "(NIGHTSHIFT_ARTIFACT_CONN_ID / AWS_ACCESS_KEY_ID) and the bucket policy",
                              retryable=False)
        if code in ("NoSuchBucket",):
            return StoreError(f"artifact store: bucket {self.bucket!r} does not exist ({doing} {uri}); create it "
                              "or fix NIGHTSHIFT_ARTIFACT_ROOT", retryable=False)
        if code in ("EntityTooLarge", "QuotaExceeded", "InsufficientStorage", "507", "XMinioStorageFull"):
            return StoreError(f"artifact store full: {doing} {uri} failed ({code}); free space or raise the quota",
                              retryable=False)
        return StoreError(f"artifact store: {doing} {uri} failed ({type(exc).__name__}: {exc})")

    def _call(self, rel: str, doing: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - botocore's ClientError / EndpointConnectionError / ...
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"s3://{self.bucket}/{self.key(rel)}") from exc
            raise self._error(exc, rel, doing) from exc

    def _head(self, rel: str) -> dict[str, Any] | None:
        try:
            return self._call(rel, "reading", self.client.head_object, Bucket=self.bucket, Key=self.key(rel))
        except FileNotFoundError:
            return None

    def _list(self, rel_prefix: str) -> list[dict[str, Any]]:
        """Every object under ``rel_prefix/`` (Key, Size, ETag)."""
        prefix = self.key(rel_prefix).rstrip("/") + "/" if rel_prefix.strip("/") else (
            f"{self.prefix}/" if self.prefix else "")
        out: list[dict[str, Any]] = []
        token = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            page = self._call(rel_prefix, "listing", self.client.list_objects_v2, **kw)
            out.extend(page.get("Contents", []))
            if not page.get("IsTruncated"):
                return out
            token = page.get("NextContinuationToken")

    # -- transfer ------------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self._head(rel) is not None or bool(self._list(rel))

    def fetch_file(self, rel: str) -> Path | None:
        head = self._head(rel)
        return None if head is None else self._download(rel, head)

    def children(self, rel: str) -> list[str]:
        prefix = self.key(rel).rstrip("/") + "/" if rel.strip("/") else (f"{self.prefix}/" if self.prefix else "")
        names: list[str] = []
        token = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
            if token:
                kw["ContinuationToken"] = token
            page = self._call(rel, "listing", self.client.list_objects_v2, **kw)
            names += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
            if not page.get("IsTruncated"):
                return sorted(names)
            token = page.get("NextContinuationToken")

    def files(self, rel: str) -> set[str]:
        return {self._rel_of_key(o["Key"]) for o in self._list(rel)}

    def delete(self, rel: str) -> None:
        (self.local_root / rel).unlink(missing_ok=True)
        try:
            self._call(rel, "deleting", self.client.delete_object, Bucket=self.bucket, Key=self.key(rel))
        except FileNotFoundError:
            pass

    def _download(self, rel: str, head: dict[str, Any]) -> Path:
        dest = self.local_root / rel
        want = (head.get("Metadata") or {}).get(SHA_META)
        if dest.is_file() and want and _cached_sha(dest) == want:
            return dest  # the cache holds these bytes
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        try:
            self._call(rel, "downloading", self.client.download_file, self.bucket, self.key(rel), tmp)
            got = sha256_file(tmp)
            if want and got != want:
                raise StoreError(f"artifact store: s3://{self.bucket}/{self.key(rel)} read back with sha256 {got[:12]} "
                                 f"but was written with {want[:12]} (corrupt or torn object); not used")
            os.replace(tmp, dest)
            _remember_sha(dest, got)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return dest

    def fetch(self, uri_or_path: str | os.PathLike, *, required: bool = True) -> Path:
        """Download the file or folder at ``uri_or_path`` into the working copy (verified) and
        return its local path. A path or URI outside this store comes back as a local path.

        :raises StoreError: nothing there (``required``), unreachable, denied, or corrupt.
        """
        rel = self.rel(uri_or_path)
        if rel is None:
            return Path(str(uri_or_path).removeprefix("file://"))
        head = self._head(rel) if rel else None
        if head is not None:
            return self._download(rel, head)
        objects = self._list(rel)
        for obj in objects:
            r = self._rel_of_key(obj["Key"])
            if _in_temp(r):
                continue
            h = self._head(r)
            if h is not None:
                self._download(r, h)
        dest = self.local_root / rel
        if not objects:
            if required:
                raise StoreError(f"artifact store: nothing at {self.to_uri(dest)}", retryable=False)
        else:
            dest.mkdir(parents=True, exist_ok=True)
        return dest

    def _upload(self, path: Path, rel: str) -> None:
        """Upload ``path`` with the sha256 of exactly the bytes sent: hashed and sent from one open
        file, so a writer that replaces the file meanwhile cannot pair new bytes with an old hash."""
        with open(path, "rb") as f:
            h = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
            sha = h.hexdigest()
            head = self._head(rel)
            if head is not None and (head.get("Metadata") or {}).get(SHA_META) == sha:
                return  # already there
            f.seek(0)
            self._call(rel, "writing", self.client.upload_fileobj, f, self.bucket, self.key(rel),
                       ExtraArgs={"Metadata": {SHA_META: sha}})

    def publish(self, path: str | os.PathLike) -> str:
        """Upload a file or a folder of the working copy (files whose bytes the store does not hold
        yet); return its URI. A path outside the working copy is refused."""
        p = Path(path)
        rel = self.rel(p)
        if rel is None:
            raise StoreError(f"{p} is not under the artifact store's working copy {self.local_root}", retryable=False)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                r = self.rel(f) or ""
                if f.is_file() and not f.is_symlink() and not _in_temp(r) and not f.name.endswith(".lock"):
                    self._upload(f, r)
        elif p.is_file():
            self._upload(p, rel)
        else:
            raise StoreError(f"cannot publish {p}: it does not exist", retryable=False)
        return self.to_uri(p)

    # -- small shared state -------------------------------------------------------------------------
    def read_json(self, rel: str) -> Any:
        try:
            body = self._call(rel, "reading", self.client.get_object, Bucket=self.bucket, Key=self.key(rel))["Body"]
            raw = body.read()
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise StoreError(f"s3://{self.bucket}/{self.key(rel)} is not valid JSON ({exc})", retryable=False) from exc

    def write_json(self, rel: str, obj: Any) -> str:
        from nightshift.artifacts import atomic_write_json

        local = atomic_write_json(self.local_root / rel, obj)  # the working copy stays what was written
        self._upload(local, rel)
        return self.to_uri(local)

    def append_record(self, rel: str, record: dict[str, Any], *, key: str | None = None) -> bool:
        """One object per record under ``<rel>.d/``; a record with ``key`` is named by the key's
        hash and created with ``If-None-Match: *``, so writing it twice keeps the first. True when written."""
        from nightshift.artifacts import json_safe

        if key is not None:
            record = {**record, "key": key}
        name = (hashlib.sha256(key.encode()).hexdigest()[:32] if key is not None
                else f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}")
        obj_rel = f"{rel}{RECORDS_SUFFIX}/{name}.json"
        body = json.dumps(json_safe(record), sort_keys=True).encode("utf-8")
        try:
            self._call(obj_rel, "writing", self.client.put_object, Bucket=self.bucket, Key=self.key(obj_rel), Body=body,
                       IfNoneMatch="*", Metadata={SHA_META: hashlib.sha256(body).hexdigest()})
        except StoreError as exc:
            if isinstance(exc.__cause__, Exception) and _code(exc.__cause__) in ("PreconditionFailed", "412"):
                return False
            raise
        return True

    def read_records(self, rel: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        """The records under ``<rel>.d/`` in time order (the ``time`` field, then the object name);
        with ``limit``, only the newest ``limit`` objects (by write time) are read."""
        out = []
        objects = self._list(f"{rel}{RECORDS_SUFFIX}")
        if limit is not None:
            objects = sorted(objects, key=lambda o: (o.get("LastModified") or 0, o["Key"]))[-limit:] if limit > 0 else []
        for obj in objects:
            r = self._rel_of_key(obj["Key"])
            try:
                body = self._call(r, "reading", self.client.get_object, Bucket=self.bucket, Key=obj["Key"])["Body"]
                out.append((str(obj.get("LastModified", "")), r, json.loads(body.read())))
            except (FileNotFoundError, ValueError):
                continue
        out.sort(key=lambda t: (str(t[2].get("time", "")) if isinstance(t[2], dict) else "", t[0], t[1]))
        return [rec for _, _, rec in out if isinstance(rec, dict)]

    # -- lock -------------------------------------------------------------------------------------------
    @property
    def lease_client(self) -> Any:
        """A client for lease renewals: short timeouts, one attempt (a renewal that cannot finish
        well inside the lease is a failure to report, not to retry blindly)."""
        with self._client_lock:
            if getattr(self, "_lease_client", None) is None:
                import boto3
                from botocore.config import Config

                o = self.options
                t = max(1.0, self.LEASE_S / 6)
                self._lease_client = boto3.client(
                    "s3", endpoint_url=o.endpoint_url, region_name=o.region_name, aws_access_key_id=o.access_key,
                    aws_secret_access_key=o.secret_key, aws_session_token=o.session_token,
                    config=Config(retries={"max_attempts": 1}, connect_timeout=t, read_timeout=t,
                                  s3={"addressing_style": "path"}))
            return self._lease_client

    def _lease_body(self, token: str, purpose: str) -> bytes:
        return json.dumps({"token": token, "pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose[:200],
                           "since": datetime.now(timezone.utc).isoformat(),
                           "expires": time.time() + self.LEASE_S}).encode()

    @contextlib.contextmanager
    def lock(self, rel: str, *, timeout_s: float, purpose: str = "", what: str = "the lock", hint: str = "",
             error: type[Exception] | None = None, on_wait: Any = None) -> Iterator[str]:
        """An exclusive lease on ``rel``: created with ``If-None-Match: *`` and renewed by its holder
        every ``LEASE_S / 3`` with ``If-Match``.

        A holder that dies stops renewing: a waiter takes the lease over (a conditional delete on the
        ETag it read, so two waiters cannot both do it) once the lease's own expiry has passed **and**
        the waiter has seen the same ETag for two renewal periods on its own monotonic clock (so a
        clock skew between hosts cannot end a live holder's lease). A holder that loses its lease
        (renewals failed for a whole lease: the store unreachable) gets :class:`StoreError` when its
        block ends, so what it did is not reported as done under the lock.

        :raises StoreLockTimeout: (or ``error``) not acquired within ``timeout_s``; names the holder.
        """
        uri = f"s3://{self.bucket}/{self.key(rel)}"
        token = uuid.uuid4().hex
        deadline = time.monotonic() + max(0.0, float(timeout_s))
        waited = False
        seen: tuple[str | None, float] = (None, 0.0)  # (holder ETag, when this waiter first saw it)
        while True:
            try:
                etag = self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=self._lease_body(token, purpose),
                                              IfNoneMatch="*")["ETag"]
                break
            except Exception as exc:  # noqa: BLE001
                if _code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise self._error(exc, rel, "locking") from exc
            holder, holder_etag = self._lock_holder(rel)
            now = time.monotonic()
            if holder_etag != seen[0]:
                seen = (holder_etag, now)
            stale = (holder is not None and holder_etag and float(holder.get("expires", 0)) < time.time()
                     and now - seen[1] >= 2 * self.LEASE_S / 3)
            if stale:
                log.warning("%s (%s): the lease of %s expired without renewal; taking it over", what, uri,
                            _holder_text(holder))
                with contextlib.suppress(Exception):
                    self.client.delete_object(Bucket=self.bucket, Key=self.key(rel), IfMatch=holder_etag)
                continue
            if not waited:
                waited = True
                log.info("%s (%s) is held by %s: waiting up to %.0fs", what, uri, _holder_text(holder), timeout_s)
                if on_wait is not None:
                    on_wait()
            if now >= deadline:
                raise (error or StoreLockTimeout)(f"{what} ({uri}) is held by {_holder_text(holder)}; waited "
                                                  f"{timeout_s:.0f}s." + (f" {hint}" if hint else ""))
            time.sleep(0.2)
        stop = threading.Event()
        state: dict[str, Any] = {"etag": etag, "renewed": time.monotonic(), "lost": None}

        def renew() -> None:
            while not stop.wait(self.LEASE_S / 3):
                try:
                    state["etag"] = self.lease_client.put_object(
                        Bucket=self.bucket, Key=self.key(rel), Body=self._lease_body(token, purpose),
                        IfMatch=state["etag"])["ETag"]
                    state["renewed"] = time.monotonic()
                    continue
                except Exception as exc:  # noqa: BLE001 - judged below
                    failure = exc
                # a renewal whose reply was lost still moved the ETag: adopt it when the lease is ours
                holder, holder_etag = self._lock_holder(rel)
                if holder is not None and holder.get("token") == token and holder_etag:
                    state["etag"] = holder_etag
                    continue
                if holder is not None and holder.get("token") != token:
                    state["lost"] = f"taken over by {_holder_text(holder)}"
                elif time.monotonic() - state["renewed"] >= self.LEASE_S:
                    state["lost"] = f"not renewed for {self.LEASE_S:.0f}s ({failure})"
                if state["lost"]:
                    log.error("%s (%s): lease lost: %s", what, uri, state["lost"])
                    return
                log.warning("%s (%s): renewing the lease failed (%s); retrying", what, uri, failure)

        t = threading.Thread(target=renew, name=f"lease-{rel}", daemon=True)
        t.start()
        try:
            yield uri
        finally:
            stop.set()
            t.join(timeout=self.LEASE_S)
            if state["lost"] is None:
                with contextlib.suppress(Exception):
                    self.client.delete_object(Bucket=self.bucket, Key=self.key(rel), IfMatch=state["etag"])
        if state["lost"]:
            raise StoreError(f"{what} ({uri}) was lost while held: {state['lost']}; another writer may have "
                             "acted meanwhile, so this one's result is not trusted (retry)")

    def _lock_holder(self, rel: str) -> tuple[dict[str, Any] | None, str | None]:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key(rel))
            return json.loads(r["Body"].read()), r.get("ETag")
        except Exception:  # noqa: BLE001 - gone between the put and the read, or unreadable
            return None, None


def _code(exc: BaseException) -> str:
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        err = resp.get("Error", {}) or {}
        return str(err.get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return ""


def _holder_text(h: dict[str, Any] | None) -> str:
    if not h:
        return "an unknown holder"
    return (f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')}"
            + (f" ({h['purpose']})" if h.get("purpose") else ""))


# sha256 of working-copy files, keyed by (path, size, mtime_ns, inode): a cache hit re-hashes nothing
_sha_cache: dict[tuple[str, int, int, int], str] = {}
_sha_lock = threading.Lock()


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def _cached_sha(path: Path) -> str:
    k = _stat_key(path)
    with _sha_lock:
        if k in _sha_cache:
            return _sha_cache[k]
    sha = sha256_file(path)
    with _sha_lock:
        _sha_cache[k] = sha
    return sha


def _remember_sha(path: Path, sha: str) -> None:
    with _sha_lock:
        _sha_cache[_stat_key(path)] = sha
