"""Image sources. Each yields decoded images as uint8 arrays of the configured shape.

A source never silently drops data: files it cannot decode are reported in
``SourceData.undecodable`` with the reason, and the snapshot manifest lists them.

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

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np

from nightshift.errors import ConfigError, DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


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


def to_shape(img: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Convert an HxW or HxWxC uint8 image to ``shape`` (resize + channel conversion)."""
    from PIL import Image

    h, w, c = shape
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 4:  # drop alpha
        img = img[:, :, :3]
    if img.shape[:2] != (h, w):
        mode = "L" if img.shape[2] == 1 else "RGB"
        pil = Image.fromarray(img[:, :, 0] if mode == "L" else img, mode=mode)
        img = np.asarray(pil.resize((w, h), Image.BILINEAR))
        if img.ndim == 2:
            img = img[:, :, None]
    if img.shape[2] != c:
        if c == 1:  # ITU-R 601 luma, as PIL's convert("L")
            img = (img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
            img = np.clip(np.rint(img), 0, 255).astype(np.uint8)[:, :, None]
        elif c == 3 and img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        else:
            raise ConfigError(f"cannot convert {img.shape[2]} channels to {c}")
    return np.ascontiguousarray(img, dtype=np.uint8)


def decode_image(data: bytes) -> np.ndarray:
    """Decode PNG/JPEG/... bytes into an HxWxC uint8 array; raises on corrupt data."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()  # forces a full decode: truncated files fail here, not later
        if im.mode not in ("L", "RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.mode else "RGB")
        arr = np.asarray(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {arr.dtype}")
    return arr


def _decode_error(exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "UnidentifiedImageError: not a readable image (corrupt, or not PNG/JPEG/BMP/GIF/WebP)"
    return f"{type(exc).__name__}: {exc}"


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


def load_imagefolder(
    root: Any, shape: tuple[int, int, int], class_names: list[str] | None = None
) -> SourceData:
    """Read ``root/<class>/<file>``. ``class_names`` fixes the label order; a class
    folder not in it is reported as an error rather than silently ignored."""
    root_s = str(root)
    try:
        if not root.is_dir():
            raise DataError(f"imagefolder source {root_s!r} is not a directory")
        class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    except FileNotFoundError as exc:
        raise DataError(f"imagefolder source {root_s!r} does not exist") from exc
    found = [p.name for p in class_dirs]
    if not found:
        raise DataError(f"imagefolder source {root_s!r} has no class folders (expected <root>/<class>/<image>)")
    if class_names is None:
        class_names = found
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise DataError(
                f"imagefolder source {root_s!r} has class folder(s) {unknown} that are not in the "
                f"configured classes {class_names}: fix the folder names or the 'classes' setting"
            )
    index = {name: i for i, name in enumerate(class_names)}
    images, labels, sizes, origins, bad = [], [], [], [], []
    for cdir in class_dirs:
        files = sorted((p for p in cdir.iterdir() if not p.is_dir()), key=lambda p: p.name)
        for f in files:
            rel = f"{cdir.name}/{f.name}"
            if Path(f.name).suffix.lower() not in IMAGE_SUFFIXES:
                if not f.name.startswith("."):
                    bad.append({"path": rel, "error": "not an image file (unsupported extension)"})
                continue
            try:
                arr = decode_image(f.read_bytes())
            except Exception as exc:  # noqa: BLE001 - any decode failure is reported per file
                bad.append({"path": rel, "error": _decode_error(exc)})
                continue
            sizes.append(arr.shape)
            images.append(to_shape(arr, shape))
            labels.append(index[cdir.name])
            origins.append(rel)
    if not images:
        h, w, c = shape
        img_arr = np.zeros((0, h, w, c), np.uint8)
    else:
        img_arr = np.stack(images)
    return SourceData(
        images=img_arr,
        labels=np.asarray(labels, np.int64),
        class_names=list(class_names),
        orig_sizes=np.asarray(sizes, np.int64).reshape(-1, 3),
        origins=origins,
        source={"kind": "imagefolder", "root": root_s},
        undecodable=bad,
    )


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
        source={"kind": "torchvision", "name": name, "root": str(root)},
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
