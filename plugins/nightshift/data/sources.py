"""Image sources. Each yields decoded images as uint8 arrays of the configured shape.

A source never silently drops data: files it cannot decode are reported in
``SourceData.undecodable`` with the reason, and the snapshot manifest lists them.
An ImageFolder source stays inside its root: a symbolic link (file or folder)
that resolves outside the root is not followed; it is reported the same way,
with where it points, and validation then fails naming it.

Sources:

* ``bundled`` — scikit-learn's ``load_digits`` (1,797 real 8×8 handwritten digits,
  10 classes), shipped with scikit-learn, so it works offline.
* ``imagefolder`` — ``<root>/<class_name>/<image>`` with PNG/JPEG files of any size,
  grayscale or RGB; ``root`` is a local path or any ``pathlib``-like object
  (Airflow's ``ObjectStoragePath`` for ``s3://``, ``gs://``, ``file://`` ...).
* ``torchvision`` — any ``torchvision.datasets`` class taking ``root``/``train``/
  ``download`` (CIFAR10, MNIST, FashionMNIST, ...) or ``FakeData``.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np

from nightshift.data.decode import IMAGE_SUFFIXES, decode_blobs, decode_error, decode_image, to_shape  # noqa: F401 (re-exported)
from nightshift.errors import ConfigError, DataError

#: A pack: an uncompressed tar of ``<class>/<image>`` members, read with one request.
PACK_SUFFIX = ".tar"
#: The largest pack read: a pack is held in memory (twice: fetched, then in its decode worker) with
#: a few others in flight, so a bigger one is reported instead of exhausting the worker's memory.
MAX_PACK_BYTES = 512 * 2**20
#: Archives that are not read as packs: reported, so they are not silently left out.
UNREAD_ARCHIVES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".zip")

log = logging.getLogger(__name__)


class PathLike(Protocol):  # what we need from Path / ObjectStoragePath
    name: str

    def iterdir(self) -> Iterable["PathLike"]: ...
    def is_dir(self) -> bool: ...
    def read_bytes(self) -> bytes: ...


@dataclass
class SourceData:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    orig_sizes: np.ndarray  # (N, 3) int: orig height, width, channels
    origins: list[str]  # where each image came from
    source: dict[str, Any]  # description recorded in the manifest
    undecodable: list[dict[str, str]] = field(default_factory=list)
    predefined_split: np.ndarray | None = None  # (N,) str, when the source fixes one


def load_bundled(shape: tuple[int, int, int] = (8, 8, 1)) -> SourceData:
    """scikit-learn's digits: 1,797 real 8×8 grayscale images with values 0..16."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = np.stack([to_shape(im, shape) for im in raw])
    n = len(images)
    return SourceData(
        images=images,
        labels=digits.target.astype(np.int64),
        class_names=[str(i) for i in range(10)],
        orig_sizes=np.tile(np.array([[8, 8, 1]]), (n, 1)),
        origins=[f"sklearn.load_digits:{i}" for i in range(n)],
        source={"kind": "bundled", "name": "sklearn.load_digits"},
    )


@dataclass
class FileEntry:
    """One image file of an ImageFolder source and what identifies its content."""

    rel: str  # "<class>/<file>" or "<partition>/<class>/<file>"
    class_name: str
    path: Any  # a local path (str) or an ObjectStoragePath
    size: int
    mtime: str  # modification time (ns) or the object store's ETag/last-modified
    pack: bool = False  # a tar pack of <class>/<image> members (rel: "<name>.tar"); class_name is ""


class ObjectFile:
    """One object of an object-storage source, as its store listed it: the (fsspec) file
    system, the path on it, and the listing's info (size, ETag, ...): no request per file."""

    __slots__ = ("fs", "info", "path")

    def __init__(self, fs: Any, path: str, info: dict[str, Any]) -> None:
        self.fs, self.path, self.info = fs, path, info

    def stat(self) -> dict[str, Any]:
        return self.info

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def __repr__(self) -> str:
        return f"ObjectFile({self.path!r})"


@dataclass
class Listing:
    entries: list[FileEntry]
    class_names: list[str]
    skipped: list[dict[str, str]]  # files not read (not images, links out of the root): reported as undecodable
    partitions: list[str] = field(default_factory=list)


def _local_stamp(st: os.stat_result) -> tuple[int, str]:
    """``(size, stamp)`` of a local file. The stamp is mtime, ctime and inode: ``cp -p``, ``rsync -a``
    and ``tar x`` restore an old mtime on new content, but nobody can set ctime, and a
    replaced file is a new inode; a file whose stamp changed is decoded again."""
    return int(st.st_size), f"{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def _stat(p: Any) -> tuple[int, str]:
    if isinstance(p, Path):
        return _local_stamp(p.stat())
    info = p.stat()  # ObjectStoragePath: fsspec info dict (size, ETag / mtime / LastModified)
    get = info.get if isinstance(info, dict) else (lambda k, d=None: getattr(info, k, d))
    size = get("size", None)
    if size is None:
        size = get("st_size", 0)
    stamp = get("ETag", None) or get("etag", None) or get("mtime", None) or get("LastModified", None) \
        or get("last_modified", None) or get("st_mtime", None) or get("created", None)
    # No modification stamp at all: "" means "cannot tell if it changed", and such a
    # file is always decoded again (incremental collection must not trust size alone).
    return int(size or 0), "" if stamp is None else str(stamp)


def _local_path(p: Any) -> str | None:
    """``p`` on the local file system (a ``Path``, a ``DirEntry`` or a ``file://`` ObjectStoragePath), else None."""
    if isinstance(p, (Path, os.DirEntry)):
        return os.fspath(p)
    if getattr(p, "protocol", None) in ("file", "local"):
        return str(p.path)
    return None


def _escape(p: Any, root_real: str | None) -> str | None:
    """Where ``p`` leads when it is a symbolic link that resolves outside the source root
    (``root_real``, itself resolved); None for anything else (a link inside the root is fine)."""
    local = _local_path(p) if root_real is not None else None
    if local is None or not (p.is_symlink() if isinstance(p, os.DirEntry) else os.path.islink(local)):
        return None
    target = os.path.realpath(local)
    return None if target == root_real or target.startswith(root_real.rstrip(os.sep) + os.sep) else target


def _not_followed(target: str, root_real: str) -> str:
    return (f"symbolic link to {target}, outside the source root {root_real}: not followed (copy the file "
            "into the source folder, or point the source at the folder that holds it)")


def _subdirs(root: Any, root_real: str | None = None, skipped: list[dict[str, str]] | None = None,
             prefix: str = "") -> list[Any]:
    """Sub-folders of ``root`` in name order, hidden ones left out; a folder that is a link out of
    the source root is left out too and recorded in ``skipped``."""
    out = []
    for p in root.iterdir():
        if p.name.startswith(".") or not p.is_dir():
            continue
        target = _escape(p, root_real)
        if target is not None:
            if skipped is not None:
                skipped.append({"path": f"{prefix}{p.name}/", "error": _not_followed(target, root_real or "")})
            continue
        out.append(p)
    return sorted(out, key=lambda p: p.name)


def _packs(folder: Any, prefix: str, root_s: str, root_real: str | None,
           skipped: list[dict[str, str]]) -> list[FileEntry]:
    """The tar packs (``<name>.tar``) directly in ``folder`` (the source root, or a partition), with
    their size and stamp from the listing. Compressed archives there are reported in ``skipped``
    (they are not read); other files beside the class folders (a README, ...) are none of ours."""
    if isinstance(folder, Path):
        with os.scandir(folder) as it:
            listed = [(e.name, e) for e in it if not e.is_dir()]
    elif _local_path(folder) is None and hasattr(folder, "fs"):
        listed = [(posixpath.basename(i["name"].rstrip("/")), ObjectFile(folder.fs, i["name"], i))
                  for i in _ls(folder, root_s) if i.get("type") != "directory"]
    else:
        listed = [(p.name, p) for p in folder.iterdir() if not p.is_dir()]
    out = []
    for name, f in sorted(listed, key=lambda t: t[0]):
        rel = f"{prefix}{name}"
        lower = name.lower()
        if name.startswith("."):
            continue
        if lower.endswith(UNREAD_ARCHIVES):
            skipped.append({"path": rel, "error": "compressed archive: not read (a pack is an uncompressed "
                            "<name>.tar of <class>/<image> members; the images are compressed already)"})
            continue
        if not lower.endswith(PACK_SUFFIX):
            continue
        target = _escape(f, root_real)
        if target is not None:
            skipped.append({"path": rel, "error": _not_followed(target, root_real or "")})
            continue
        try:
            size, stamp = _local_stamp(f.stat()) if isinstance(f, os.DirEntry) else _stat(f)
        except OSError as exc:
            skipped.append({"path": rel, "error": f"cannot be read: {type(exc).__name__}: {exc.strerror or exc}"})
            continue
        if size > MAX_PACK_BYTES:
            skipped.append({"path": rel, "error": f"pack of {size / 2**20:.0f} MiB: larger than the {MAX_PACK_BYTES >> 20} "
                            "MiB a decode worker holds at once, not read (split it into smaller packs)"})
            continue
        out.append(FileEntry(rel, "", f.path if isinstance(f, os.DirEntry) else f, size, stamp, pack=True))
    return out


def list_imagefolder(root: Any, class_names: list[str] | None = None, *, partition_window: int | None = None,
                     io_concurrency: int = 16) -> Listing:
    """List ``root/<class>/<file>`` (or ``root/<partition>/<class>/<file>`` with
    ``partition_window``: the last N partition folders in name order, e.g. dates).

    Packs: an uncompressed ``root/<name>.tar`` (or ``root/<partition>/<name>.tar``) holding
    ``<class>/<image>`` members is one entry (``FileEntry.pack``), read with one request and
    unpacked by the decoders -- the layout for object storage, where one GET per small image
    costs more than decoding it. Packs and class folders may be mixed. Members are not listed
    here, so ``class_names`` must be given when there are packs.

    Files are stat-ed (size and modification time or ETag) with up to
    ``io_concurrency`` requests in flight, for object storage.

    A symbolic link (file or folder) that resolves outside the root is not
    followed: it lands in ``Listing.skipped`` with where it points (and a
    warning is logged); a link that stays inside the root is followed.

    :raises DataError: the root is missing or empty, a class folder is not in
        ``class_names``, or a configured class has no folder (and there are no packs).
    :raises ConfigError: there are packs and no ``class_names``.
    """
    from concurrent.futures import ThreadPoolExecutor

    root = Path(root) if isinstance(root, (str, os.PathLike)) and not hasattr(root, "iterdir") else root
    root_s = str(root)
    local_root = _local_path(root)
    root_real = os.path.realpath(local_root) if local_root is not None else None
    skipped: list[dict[str, str]] = []
    top_links: list[dict[str, str]] = []  # top-level folder links out of the root
    if local_root is None:
        _forget_listings(root)
    try:
        if not root.is_dir():
            raise DataError(f"imagefolder source {root_s!r} is not a directory")
        top = _subdirs(root, root_real, top_links)
    except FileNotFoundError as exc:
        raise DataError(f"imagefolder source {root_s!r} does not exist") from exc
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unreachable store, refused credentials, ...
        raise _unreadable(root_s, exc) from exc
    top_links.sort(key=lambda s: s["path"])
    partitions: list[str] = []
    if partition_window is not None:
        if int(partition_window) < 1:
            raise ConfigError(f"partition_window must be a positive number of partitions, got {partition_window}")
        if not top and not top_links:
            raise DataError(f"imagefolder source {root_s!r} has no partition folders (expected "
                            "<root>/<partition>/<class>/<image>, e.g. <root>/2026-11-22/cat/1.jpg)")
        # the window counts a partition linked in from outside (not read, reported), so a run never
        # quietly falls back to older partitions; links older than the window are none of its business
        names = sorted([p.name for p in top] + [s["path"].rstrip("/") for s in top_links])
        window = set(names[-int(partition_window):])
        chosen = [p for p in top if p.name in window]
        partitions = [p.name for p in chosen]
        skipped.extend(s for s in top_links if s["path"].rstrip("/") in window)
        class_dirs = [(f"{part.name}/", c) for part in chosen
                      for c in _subdirs(part, root_real, skipped, f"{part.name}/")]
    else:
        class_dirs = [("", c) for c in top]
        skipped.extend(top_links)
    try:
        if partition_window is None:
            packs = _packs(root, "", root_s, root_real, skipped)
        else:
            packs = [e for part in chosen for e in _packs(part, f"{part.name}/", root_s, root_real, skipped)]
            # a pack at the root belongs to no partition: reported, not read
            skipped.extend({"path": e.rel, "error": "pack at the root of a partitioned source: not read (put it "
                            "in a partition folder, <root>/<partition>/<name>.tar)"}
                           for e in _packs(root, "", root_s, root_real, []))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unreachable store, refused credentials, ...
        raise _unreadable(root_s, exc) from exc
    found = sorted({c.name for _, c in class_dirs})
    where = f"partitions {partitions} of " if partitions else ""
    if packs and class_names is None:
        raise ConfigError(f"imagefolder source {where}{root_s!r} holds {len(packs)} pack(s) "
                          f"({packs[0].rel}, ...): set 'classes' to the class names, in label order -- the "
                          "classes inside packs are only known once the packs are read")
    if not found and not packs:
        links = [s["path"] for s in skipped if s["path"].endswith("/")]
        raise DataError(f"imagefolder source {where}{root_s!r} has no class folders "
                        "(expected <root>/<class>/<image>)"
                        + (f"; folder link(s) out of the source root, not followed: {links}" if links else ""))
    if class_names is None:
        class_names = found
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise DataError(
                f"imagefolder source {root_s!r} has class folder(s) {unknown} that are not in the "
                f"configured classes {class_names}: fix the folder names or the 'classes' setting"
            )
        missing = [c for c in class_names if c not in found]
        if missing and not packs:  # with packs, a class may live in them only
            links = [s["path"] for s in skipped if s["path"].endswith("/")]
            raise DataError(f"imagefolder source {where}{root_s!r} has no folder for configured class(es) "
                            f"{missing} (expected {root_s}/<class>/ for each of {class_names}): a class folder "
                            "disappeared, or remove it from the 'classes' setting"
                            + (f"; folder link(s) out of the source root, not followed: {links}" if links else ""))
    files: list[tuple[str, str, Any]] = []
    stats: list[tuple[int, str]] = []
    for prefix, cdir in class_dirs:
        if isinstance(cdir, Path):  # local: one scandir, and the stat each entry carries
            with os.scandir(cdir) as it:
                listed = sorted(((e.name, e) for e in it if not e.is_dir()), key=lambda t: t[0])
        elif local_root is None and hasattr(cdir, "fs"):  # object storage: one (paged) listing with details
            listed = sorted(((posixpath.basename(i["name"].rstrip("/")), ObjectFile(cdir.fs, i["name"], i))
                             for i in _ls(cdir, root_s) if i.get("type") != "directory"), key=lambda t: t[0])
        else:
            listed = sorted(((p.name, p) for p in cdir.iterdir() if not p.is_dir()), key=lambda t: t[0])
        for name, f in listed:
            rel = f"{prefix}{cdir.name}/{name}"
            if name.startswith("."):
                continue
            target = _escape(f, root_real)
            if target is not None:
                skipped.append({"path": rel, "error": _not_followed(target, root_real or "")})
                continue
            if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                skipped.append({"path": rel, "error": "not an image file (unsupported extension)"})
                continue
            if isinstance(f, ObjectFile):
                files.append((rel, cdir.name, f))
                stats.append(_stat(f))
                continue
            if isinstance(f, os.DirEntry):
                try:
                    stat = f.stat()
                except OSError as exc:  # a dangling link, or the file went away
                    reason = f"cannot be read: {type(exc).__name__}: {exc.strerror or exc}"
                    skipped.append({"path": rel, "error": reason})
                    continue
                files.append((rel, cdir.name, f.path))
                stats.append(_local_stamp(stat))
            else:
                files.append((rel, cdir.name, f))
    links = [s for s in skipped if s["error"].startswith("symbolic link")]
    if links:
        log.warning("imagefolder source %s: %d symbolic link(s) lead outside the source root and were not followed "
                    "(reported as unreadable, so validation fails naming them): %s", root_s, len(links),
                    ", ".join(f"{s['path']}" for s in links[:5]) + (" ..." if len(links) > 5 else ""))
    if len(stats) != len(files):  # object storage: stat with bounded concurrency

        def stat_or_error(t: tuple[str, str, Any]) -> tuple[int, str] | OSError:
            try:
                return _stat(t[2])
            except OSError as exc:  # gone since the listing, or a dangling link on file://
                return exc

        if len(files) < 64:
            results = [stat_or_error(t) for t in files]
        else:
            with ThreadPoolExecutor(max_workers=max(1, io_concurrency)) as pool:
                results = list(pool.map(stat_or_error, files))
        kept = []
        for t, r in zip(files, results):
            if isinstance(r, OSError):
                skipped.append({"path": t[0], "error": f"cannot be read: {type(r).__name__}: {r.strerror or r}"})
            else:
                kept.append((t, r))
        files, stats = [t for t, _ in kept], [r for _, r in kept]
    entries = [FileEntry(rel, cls, f, size, mtime) for (rel, cls, f), (size, mtime) in zip(files, stats)]
    entries.extend(packs)
    if not entries:
        raise DataError(f"imagefolder source {where}{root_s!r} holds no image files "
                        f"(expected {root_s}/<class>/<image>.png|jpg for the classes {class_names}; "
                        f"{len(skipped)} other file(s) found)")
    return Listing(entries=entries, class_names=list(class_names), skipped=skipped, partitions=partitions)


def _unreadable(root_s: str, exc: BaseException) -> DataError:
    """The source cannot be reached or read at all (endpoint down, access denied, ...): retryable,
    since a store that is down may come back."""
    err = DataError(f"imagefolder source {root_s!r} cannot be read: {type(exc).__name__}: {exc} "
                    "(check the object store's endpoint and the connection's credentials)")
    err.retryable = True
    return err


def _forget_listings(root: Any) -> None:
    """Drop the listings an fsspec file system cached under ``root``: Airflow keeps one file system
    per connection for the life of the process, so a second collection would see the first's
    listing (new objects missing, replaced ones with their old ETag)."""
    cache = getattr(getattr(root, "fs", None), "dircache", None)
    if cache is None:
        return
    base = str(getattr(root, "path", "")).rstrip("/")
    for key in [k for k in list(cache) if k == base or k.startswith(base + "/") or base.startswith(k + "/")]:
        cache.pop(key, None)


def _ls(cdir: Any, root_s: str) -> list[dict[str, Any]]:
    try:
        return cdir.fs.ls(cdir.path, detail=True)
    except FileNotFoundError:  # went away since the class folders were listed
        return []
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(root_s, exc) from exc


def read_bytes(path: Any) -> bytes:
    if isinstance(path, (str, Path)):
        with open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def read_many(paths: list[Any], concurrency: int = 64) -> list[bytes | BaseException]:
    """The contents of ``paths`` in order, an exception in place of each that could not be read.

    Objects of an S3 store (:class:`ObjectFile` on s3fs, what ``ObjectStoragePath("s3://…",
    conn_id=…)`` lists) are fetched with obstore (Rust ``object_store``: the requests run on its
    own threads, outside the GIL, up to ``concurrency`` at a time) with the credentials, endpoint
    and region of the connection the listing used: about a tenth of s3fs's client CPU per small
    object (``docs/benchmarks.md``). Objects of other stores go through one ``cat_ranges`` call
    per file system (an async store keeps ``concurrency`` requests in flight). Anything else is
    read one by one (:func:`read_bytes`).
    """
    out: list[bytes | BaseException | None] = [None] * len(paths)
    groups: dict[int, tuple[Any, list[int]]] = {}
    for i, p in enumerate(paths):
        if isinstance(p, ObjectFile):
            groups.setdefault(id(p.fs), (p.fs, []))[1].append(i)
        else:
            try:
                out[i] = read_bytes(p)
            except Exception as exc:  # noqa: BLE001 - reported per file
                out[i] = exc
    for fs, idx in groups.values():
        if _is_s3(fs):
            got = _read_s3(fs, [paths[i].path for i in idx], concurrency)
        else:
            got = _read_fsspec(fs, [paths[i].path for i in idx], concurrency)
        for i, blob in zip(idx, got):
            out[i] = blob
    return out  # type: ignore[return-value]


def _read_fsspec(fs: Any, paths: list[str], concurrency: int) -> list[bytes | BaseException]:
    kw: dict[str, Any] = {}
    if getattr(fs, "async_impl", False):
        kw["batch_size"] = max(1, int(concurrency))
        import inspect

        if "max_concurrency" in inspect.signature(fs._cat_file).parameters:
            kw["max_concurrency"] = 1  # no size lookup (and ranged parts) per small file
    try:
        return list(fs.cat_ranges(paths, None, None, on_error="return", **kw))
    except Exception as exc:  # noqa: BLE001 - the whole batch failed: reported per file
        return [exc] * len(paths)


def _is_s3(fs: Any) -> bool:
    protocol = getattr(fs, "protocol", ())
    return "s3" in ((protocol,) if isinstance(protocol, str) else tuple(protocol))


#: obstore stores by (file system, bucket, credentials): one connection pool per source, a new
#: one when the connection's credentials change (temporary credentials are refreshed)
_OBJECT_STORES: dict[tuple[Any, ...], Any] = {}


def _s3_settings(fs: Any) -> dict[str, Any]:
    """Credentials, endpoint and region of an s3fs file system, as the Airflow connection (through
    the Amazon provider's aiobotocore session) or the caller gave them."""
    import asyncio

    key, secret, token = getattr(fs, "key", None), getattr(fs, "secret", None), getattr(fs, "token", None)
    session = getattr(fs, "session", None)
    if key is None and session is not None and not getattr(fs, "anon", False):
        async def frozen() -> Any:
            creds = await session.get_credentials()
            return None if creds is None else await creds.get_frozen_credentials()

        got = asyncio.run(frozen())
        if got is not None:
            key, secret, token = got.access_key, got.secret_key, got.token
    client_kwargs = getattr(fs, "client_kwargs", None) or {}
    region = client_kwargs.get("region_name")
    if region is None and session is not None and hasattr(session, "get_config_variable"):
        region = session.get_config_variable("region")
    return {"endpoint": getattr(fs, "endpoint_url", None) or client_kwargs.get("endpoint_url"),
            "key": key, "secret": secret, "token": token, "region": region or "us-east-1",
            "anon": bool(getattr(fs, "anon", False))}


def _object_store(fs: Any, bucket: str) -> Any:
    from obstore.store import S3Store

    cfg = _s3_settings(fs)
    cache_key = (id(fs), bucket, cfg["endpoint"], cfg["key"], cfg["token"])
    store = _OBJECT_STORES.get(cache_key)
    if store is None:
        kw: dict[str, Any] = {"region": cfg["region"]}
        if cfg["endpoint"]:
            kw["endpoint"] = cfg["endpoint"]
            kw["client_options"] = {"allow_http": str(cfg["endpoint"]).startswith("http://")}
        if cfg["anon"]:
            kw["skip_signature"] = True
        elif cfg["key"]:
            kw.update(access_key_id=cfg["key"], secret_access_key=cfg["secret"])
            if cfg["token"]:
                kw["session_token"] = cfg["token"]
        store = _OBJECT_STORES[cache_key] = S3Store(bucket, **kw)  # no key: obstore's own AWS chain
    return store


def _read_s3(fs: Any, paths: list[str], concurrency: int) -> list[bytes | BaseException]:
    """``bucket/key`` paths of one s3fs file system, fetched with obstore, in order.

    Blocking ``obstore.get`` calls on ``concurrency`` threads: each releases the GIL while Rust
    does the request, and costs about half the client CPU per object of ``get_async`` +
    ``bytes_async`` under ``asyncio`` (two future bridges and the loop per object: 139 vs 254 µs
    on 1.5 KB objects, ``docs/benchmarks.md``)."""
    from concurrent.futures import ThreadPoolExecutor

    import obstore

    try:
        stores = {b: _object_store(fs, b) for b in {p.split("/", 1)[0] for p in paths}}
    except Exception as exc:  # noqa: BLE001 - no store, no object: reported per file
        return [OSError(f"cannot open the S3 store of {paths[0].split('/', 1)[0]!r}: {exc}")] * len(paths)

    def one(path: str) -> bytes | BaseException:
        bucket, key = path.split("/", 1)
        try:
            return bytes(obstore.get(stores[bucket], key).bytes())
        except FileNotFoundError as exc:
            return FileNotFoundError(f"s3://{path}: {exc}")
        except Exception as exc:  # noqa: BLE001 - reported per file, naming it
            return OSError(f"s3://{path}: {type(exc).__name__}: {exc}")

    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(int(concurrency), len(paths))),
                            thread_name_prefix="nightshift-s3-read") as pool:
        return list(pool.map(one, paths))


def load_torchvision(
    name: str, root: str | Path, shape: tuple[int, int, int], *, download: bool = True, limit: int | None = None,
    options: dict[str, Any] | None = None,
) -> SourceData:
    """A torchvision dataset's train and test parts; its own split decides ``test``."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if cls is None:
        raise ConfigError(f"torchvision.datasets has no dataset {name!r}")
    options = dict(options or {})
    # recorded in the manifest: a subset (limit) or other options is other data, for every
    # reuse key and for promotion's "same data as the champion" check
    recorded = {"kind": "torchvision", "name": name, "root": str(root), "limit": limit,
                "options": {k: options[k] for k in sorted(options)}}
    parts = []
    if name == "FakeData":  # generated, needs no download; used by tests and demos
        size = options.pop("size", 200)
        parts.append(("train", cls(size=size, image_size=(shape[2], shape[0], shape[1]), **options)))
        parts.append(("test", cls(size=max(size // 5, 10), image_size=(shape[2], shape[0], shape[1]), random_offset=10**6, **options)))
    else:
        for split, train in (("train", True), ("test", False)):
            try:
                parts.append((split, cls(root=str(root), train=train, download=download, **options)))
            except Exception as exc:  # noqa: BLE001
                raise DataError(
                    f"torchvision dataset {name} could not be loaded from {root} ({type(exc).__name__}: {exc}). "
                    "Without network access, download it elsewhere into that folder, or use an imagefolder source."
                ) from exc
    images, labels, sizes, origins, splits = [], [], [], [], []
    class_names = None
    for split, ds in parts:
        class_names = class_names or [str(c) for c in getattr(ds, "classes", [])] or None
        n = len(ds) if limit is None else min(len(ds), limit)
        for i in range(n):
            pil, y = ds[i]
            arr = np.asarray(pil)
            arr = arr[:, :, None] if arr.ndim == 2 else arr
            sizes.append(arr.shape)
            images.append(to_shape(arr, shape))
            labels.append(int(y))
            origins.append(f"torchvision.{name}:{split}:{i}")
            splits.append(split)
    if class_names is None:
        class_names = [str(i) for i in range(int(max(labels)) + 1)]
    return SourceData(
        images=np.stack(images),
        labels=np.asarray(labels, np.int64),
        class_names=class_names,
        orig_sizes=np.asarray(sizes, np.int64),
        origins=origins,
        source=recorded,
        predefined_split=np.asarray(splits),
    )


def parse_source(source: str | dict[str, Any]) -> dict[str, Any]:
    """Normalise the ``source`` setting into a dict with a ``kind``.

    Accepted strings: ``bundled``; ``imagefolder:/abs/path``; a bare local path;
    an object-storage URI (``s3://bucket/prefix``, ``gs://...``, ``file:///...``)
    for an ImageFolder tree; ``torchvision:CIFAR10``.
    """
    if isinstance(source, dict):
        if "kind" not in source:
            raise ConfigError(f"source {source!r} has no 'kind' (bundled, imagefolder or torchvision)")
        return dict(source)
    s = str(source).strip()
    if not s:
        raise ConfigError("source is empty; use 'bundled', an ImageFolder path/URI or 'torchvision:<Dataset>'")
    if s == "bundled":
        return {"kind": "bundled"}
    if s.startswith("torchvision:"):
        return {"kind": "torchvision", "name": s.split(":", 1)[1]}
    if s.startswith("imagefolder:"):
        s = s.split(":", 1)[1]
    if "://" in s or s.startswith("/") or s.startswith("."):
        return {"kind": "imagefolder", "path": s}
    raise ConfigError(
        f"source {source!r} is not understood; use 'bundled', 'imagefolder:/path', an absolute path, "
        "an object-storage URI such as 's3://bucket/prefix', or 'torchvision:CIFAR10'"
    )


def default_shape(source: dict[str, Any]) -> tuple[int, int, int]:
    if source["kind"] == "bundled":
        return (8, 8, 1)
    if source["kind"] == "torchvision" and source.get("name") in ("MNIST", "FashionMNIST", "KMNIST", "EMNIST"):
        return (28, 28, 1)
    return (32, 32, 3)
