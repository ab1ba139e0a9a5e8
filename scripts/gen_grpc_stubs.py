"""Regenerate the OIP gRPC stubs of the inference server from ``grpc_predict_v2.proto``.

Usage (from the repository root, with the dev requirements installed)::

    python scripts/gen_grpc_stubs.py          # rewrite the committed stubs
    python scripts/gen_grpc_stubs.py --check  # exit 1 if they differ from what the .proto gives

The generated ``grpc_predict_v2_pb2.py`` / ``grpc_predict_v2_pb2_grpc.py`` are committed next
to the .proto in ``plugins/nightshift/serving``, so neither the inference image nor the server
needs grpcio-tools: only ``grpcio`` and ``protobuf`` at the versions the image's wheelhouse pins
(the generated code checks both at import: protobuf's runtime must be at least the
gencode's version, same major; grpcio at least grpcio-tools'). Regenerate after changing the
.proto or the grpcio-tools pin (``constraints.txt``), and commit the result.

Two edits after ``protoc``:

* the messages go into a private descriptor pool, not protobuf's default one: the
  protocol's messages keep their standard names (``inference.ModelInferRequest``,
  needed for wire compatibility), and so do the copies inside ``tritonclient``,
  KServe's SDK and others; two copies in the default pool make the second import
  fail (``duplicate symbol 'inference.ServerLiveRequest'``), so a process that also
  loads a client (the tests, the bench) could not load the server;
* the service module imports the messages relatively (``from . import ...``): the
  package is ``nightshift.serving`` here and ``serving`` in the image.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

SERVING = Path(__file__).resolve().parents[1] / "plugins" / "nightshift" / "serving"
PROTO = "grpc_predict_v2.proto"
OUTPUTS = ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py")

_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = ("# a private pool: see scripts/gen_grpc_stubs.py (other copies of these messages, e.g.\n"
                 "# tritonclient's, may be in the default pool of the same process)\n"
                 "_POOL = _descriptor_pool.DescriptorPool()\n"
                 "DESCRIPTOR = _POOL.AddSerializedFile(")
_ABSOLUTE_IMPORT = "import grpc_predict_v2_pb2 as grpc__predict__v2__pb2"
_RELATIVE_IMPORT = "from . import grpc_predict_v2_pb2 as grpc__predict__v2__pb2"


def _replace_once(text: str, old: str, new: str, where: str) -> str:
    if text.count(old) != 1:
        raise SystemExit(f"gen_grpc_stubs: expected {old!r} once in the generated {where}, found it "
                         f"{text.count(old)} times; has grpcio-tools changed its output? Adapt this script.")
    return text.replace(old, new)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on the .proto and write the edited stubs into ``out_dir``."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise SystemExit("gen_grpc_stubs: grpcio-tools is not installed; "
                         "pip install -r requirements-dev.txt -c constraints.txt") from None
    import importlib.metadata as md

    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).parent / "_proto"
        rc = protoc.main(["protoc", f"-I{SERVING}", f"-I{include}", f"--python_out={tmp}",
                          f"--grpc_python_out={tmp}", str(SERVING / PROTO)])
        if rc != 0:
            raise SystemExit(f"gen_grpc_stubs: protoc failed on {SERVING / PROTO} (exit status {rc})")
        pb2 = (Path(tmp) / OUTPUTS[0]).read_text("utf-8")
        grpc_mod = (Path(tmp) / OUTPUTS[1]).read_text("utf-8")
    note = (f"# Generated from {PROTO} by scripts/gen_grpc_stubs.py "
            f"(grpcio-tools=={md.version('grpcio-tools')}); do not edit.\n")
    pb2 = note + _replace_once(pb2, _DEFAULT_POOL, _PRIVATE_POOL, OUTPUTS[0])
    grpc_mod = note + _replace_once(grpc_mod, _ABSOLUTE_IMPORT, _RELATIVE_IMPORT, OUTPUTS[1])
    if "warnings." not in grpc_mod:  # an import the generated module never uses (keeps `ruff --select F` clean)
        grpc_mod = grpc_mod.replace("import warnings\n", "", 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / OUTPUTS[0], out_dir / OUTPUTS[1]]
    paths[0].write_text(pb2, "utf-8")
    paths[1].write_text(grpc_mod, "utf-8")
    return paths


def stale() -> list[str]:
    """The committed stubs that differ from a fresh generation (empty: up to date)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [p.name for p in fresh
                if not (SERVING / p.name).is_file() or (SERVING / p.name).read_bytes() != p.read_bytes()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed stubs are current")
    args = parser.parse_args(argv)
    if args.check:
        changed = stale()
        if changed:
            print(f"gen_grpc_stubs: {', '.join(changed)} differ from {PROTO}; run python scripts/gen_grpc_stubs.py",
                  file=sys.stderr)
            return 1
        print("gen_grpc_stubs: the stubs are up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for p in generate(Path(tmp)):
            shutil.copyfile(p, SERVING / p.name)  # one rename-free copy per file: both are small
            print(f"wrote {SERVING / p.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
