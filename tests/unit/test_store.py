"""nightshift.store: the artifact store, a local folder or an S3 prefix (a real SeaweedFS S3 gateway here).

"Two workers" are two stores on the same root with different working copies (cache folders).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest

from nightshift import store as st
from nightshift.store import LocalStore, S3Store, StoreError, open_store


@pytest.fixture
def pair(s3_server, s3_root, tmp_path):
    """Two workers' stores on one s3 root."""
    a = open_store(s3_root, cache_dir=tmp_path / "worker-a", s3=s3_server.options())
    b = open_store(s3_root, cache_dir=tmp_path / "worker-b", s3=s3_server.options())
    return a, b


# --------------------------------------------------------------------------- choosing a store


def test_open_store_picks_the_backend(tmp_path):
    assert isinstance(open_store(tmp_path), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    s = open_store("s3://bucket/some/prefix", cache_dir=tmp_path)
    assert isinstance(s, S3Store) and s.bucket == "bucket" and s.prefix == "some/prefix"
    assert s.local_root == tmp_path / "bucket" / "some" / "prefix"
    with pytest.raises(StoreError, match="only a local folder or s3://"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError, match="no bucket"):
        open_store("s3:///x", cache_dir=tmp_path)
    with pytest.raises(StoreError, match="local cache folder"):
        open_store("s3://bucket/x")


def test_settings_working_copy_of_an_s3_root(monkeypatch, tmp_path):
    from nightshift.settings import Settings

    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", "s3://arts/nightly")
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_CACHE", str(tmp_path / "cache"))
    s = Settings.from_env()
    assert s.artifact_uri == "s3://arts/nightly"
    assert s.artifact_root == tmp_path / "cache" / "arts" / "nightly"
    assert isinstance(s.store(), S3Store) and s.store().local_root == s.artifact_root
    monkeypatch.setenv("NIGHTSHIFT_ARTIFACT_ROOT", str(tmp_path / "plain"))
    s = Settings.from_env()
    assert s.artifact_root == tmp_path / "plain" and isinstance(s.store(), LocalStore)


def test_mapping_between_uris_and_the_working_copy(tmp_path):
    s = open_store("s3://b/p", cache_dir=tmp_path)
    local = s.local_root / "runs" / "d" / "r" / "model.onnx"
    assert s.to_uri(local) == "s3://b/p/runs/d/r/model.onnx"
    assert s.to_local("s3://b/p/runs/d/r/model.onnx") == local
    assert s.rel("s3://b/p") == "" and s.to_uri(s.local_root) == "s3://b/p"
    # outside the store: unchanged, never mistaken for a key
    assert s.rel("s3://b/other/x") is None and s.to_uri("/etc/passwd") == "/etc/passwd"
    assert s.rel("s3://b/pp/x") is None  # a sibling prefix is not under p


# --------------------------------------------------------------------------- local folder: identity


def test_local_store_is_plain_files(tmp_path):
    s = open_store(tmp_path)
    f = tmp_path / "runs" / "x.json"
    assert s.write_json("runs/x.json", {"a": 1}) == str(f) and json.loads(f.read_text()) == {"a": 1}
    assert s.publish(f) == str(f) and s.fetch(str(f)) == f and s.to_uri(f) == str(f)
    assert s.read_json("missing.json") is None
    with pytest.raises(StoreError, match="does not exist"):
        s.fetch(tmp_path / "missing")
    assert s.append_record("h.jsonl", {"n": 1}, key="k") and not s.append_record("h.jsonl", {"n": 2}, key="k")
    s.append_record("h.jsonl", {"n": 3})
    (tmp_path / "h.jsonl").open("a").write('{"torn": ')  # a writer killed mid-line
    s.append_record("h.jsonl", {"n": 4})
    assert [r["n"] for r in s.read_records("h.jsonl")] == [1, 3, 4]


# --------------------------------------------------------------------------- S3: transfer


def test_a_folder_written_on_one_worker_reads_back_on_another(pair):
    a, b = pair
    run = a.local_root / "runs" / "nightly" / "r1"
    (run / "model").mkdir(parents=True)
    blob = os.urandom(50_000)
    (run / "model" / "model.onnx").write_bytes(blob)
    (run / "promotion.json").write_text('{"promoted": true}')
    (run / "model" / ".model.onnx.abc.tmp").write_bytes(b"half")  # an atomic writer's temp file
    uri = a.publish(run)
    assert uri == f"{a.uri}/runs/nightly/r1"
    got = b.fetch(uri)
    assert got == b.local_root / "runs" / "nightly" / "r1" and got != run
    assert (got / "model" / "model.onnx").read_bytes() == blob
    assert not (got / "model" / ".model.onnx.abc.tmp").exists()
    assert b.fetch(f"{uri}/promotion.json").read_text() == '{"promoted": true}'
    # every object carries its sha256
    head = b.client.head_object(Bucket=b.bucket, Key=b.key("runs/nightly/r1/model/model.onnx"))
    assert head["Metadata"][st.SHA_META] == hashlib.sha256(blob).hexdigest()


def test_the_working_copy_is_a_cache_keyed_by_digest(pair, monkeypatch):
    a, b = pair
    f = a.local_root / "snapshots" / "shards" / "abc" / "pixels.npy"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"x" * 1000)
    uri = a.publish(f)
    b.fetch(uri)
    calls = []
    real = b.client.download_file
    monkeypatch.setattr(b.client, "download_file", lambda *x, **k: calls.append(x) or real(*x, **k))
    b.fetch(uri)
    assert calls == []  # same digest: not downloaded again
    f.write_bytes(b"y" * 1000)  # new bytes under the same name (a run folder file rewritten by a retry)
    a.publish(f)
    assert b.fetch(uri).read_bytes() == b"y" * 1000 and len(calls) == 1
    local_b = b.to_local(uri)
    local_b.write_bytes(b"tampered")  # a cache file that no longer matches is replaced
    assert b.fetch(uri).read_bytes() == b"y" * 1000


def test_publish_uploads_only_what_changed(pair, monkeypatch):
    a, _ = pair
    d = a.local_root / "runs" / "d" / "r"
    d.mkdir(parents=True)
    for i in range(3):
        (d / f"{i}.txt").write_text(str(i))
    a.publish(d)
    sent = []
    real = a.client.upload_fileobj
    monkeypatch.setattr(a.client, "upload_fileobj", lambda *x, **k: sent.append(x[2]) or real(*x, **k))
    (d / "1.txt").write_text("changed")
    a.publish(d)
    assert sent == [a.key("runs/d/r/1.txt")]


def test_a_corrupt_object_is_never_read_as_valid(pair, s3_server):
    a, b = pair
    f = a.local_root / "runs" / "d" / "r" / "checkpoint.pt"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"good bytes" * 100)
    uri = a.publish(f)
    # the object's bytes change behind the store's back (torn or corrupted), its recorded sha256 stays
    head = s3_server.client().head_object(Bucket=a.bucket, Key=a.key("runs/d/r/checkpoint.pt"))
    s3_server.client().put_object(Bucket=a.bucket, Key=a.key("runs/d/r/checkpoint.pt"), Body=b"bad",
                                  Metadata=head["Metadata"])
    with pytest.raises(StoreError, match="corrupt or torn") as err:
        b.fetch(uri)
    assert uri in str(err.value)
    assert not b.to_local(uri).exists()  # nothing left where a reader looks
    assert not list(b.to_local(uri).parent.glob("*.tmp"))


def test_missing_denied_and_unreachable_name_the_uri(pair, s3_server, s3_root, tmp_path):
    a, _ = pair
    with pytest.raises(StoreError, match=f"nothing at {s3_root}/runs/none") as err:
        a.fetch(f"{s3_root}/runs/none")
    assert not err.value.retryable
    assert a.fetch(f"{s3_root}/runs/none", required=False) == a.local_root / "runs" / "none"
    denied = open_store(s3_root, cache_dir=tmp_path / "c", s3=s3_server.options(secret_key="wrong"))
    with pytest.raises(StoreError, match="access denied") as err:
        denied.write_json("deployments/m/state.json", {"v": 1})
    assert f"{s3_root}/deployments/m/state.json" in str(err.value) and not err.value.retryable
    down = open_store(s3_root, cache_dir=tmp_path / "e", s3=s3_server.options(endpoint_url="http://127.0.0.1:9"))
    with pytest.raises(StoreError, match="127.0.0.1:9|s3://") as err:
        down.read_json("a.json")
    assert err.value.retryable  # a store that is down may come back: the task's retry handles it


# --------------------------------------------------------------------------- S3: shared state


def test_json_state_and_idempotent_records_across_workers(pair):
    a, b = pair
    assert b.read_json("deployments/m/state.json") is None
    a.write_json("deployments/m/state.json", {"version": "3"})
    assert b.read_json("deployments/m/state.json") == {"version": "3"}
    assert a.append_record("registry/m/history.jsonl", {"time": "2026-01-02", "v": 2}, key="run-2/promoted")
    assert not b.append_record("registry/m/history.jsonl", {"time": "2026-01-03", "v": 2}, key="run-2/promoted")
    assert b.append_record("registry/m/history.jsonl", {"time": "2026-01-01", "v": 1})
    assert [r["v"] for r in a.read_records("registry/m/history.jsonl")] == [1, 2]  # time order
    assert b.read_records("registry/other/history.jsonl") == []


def test_concurrent_keyed_appends_write_once(pair):
    a, b = pair
    results = []
    barrier = threading.Barrier(6)

    def write(s):
        barrier.wait()
        results.append(s.append_record("h.jsonl", {"time": "t"}, key="same"))

    threads = [threading.Thread(target=write, args=(s,)) for s in (a, b) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
    assert len(a.read_records("h.jsonl")) == 1


# --------------------------------------------------------------------------- S3: the lock


def test_lock_excludes_across_workers_and_names_the_holder(pair):
    a, b = pair
    with a.lock("locks/champion/m.lock", timeout_s=5, purpose="promote run-1", what="the champion lock of 'm'"):
        with pytest.raises(StoreError, match=r"held by pid \d+ .*\(promote run-1\); waited 1s"):
            with b.lock("locks/champion/m.lock", timeout_s=1, what="the champion lock of 'm'"):
                pass
    with b.lock("locks/champion/m.lock", timeout_s=1):
        pass  # released on exit


def test_lock_of_a_killed_holder_is_taken_over_after_its_lease(pair, monkeypatch):
    a, b = pair
    monkeypatch.setattr(S3Store, "LEASE_S", 1.5)
    # a holder that died: its lease object stays, its expiry passes, no one renews it
    a.client.put_object(Bucket=a.bucket, Key=a.key("locks/x.lock"), Body=json.dumps(
        {"token": "dead", "pid": 1, "host": "gone", "since": "then", "expires": time.time() + 1.0}).encode())
    t0 = time.monotonic()
    with b.lock("locks/x.lock", timeout_s=20, purpose="after"):
        waited = time.monotonic() - t0
        holder = json.loads(b.client.get_object(Bucket=b.bucket, Key=b.key("locks/x.lock"))["Body"].read())
    assert holder["purpose"] == "after" and waited >= 0.5  # not before the lease ran out


def test_a_live_holder_renews_its_lease(pair, monkeypatch):
    a, b = pair
    monkeypatch.setattr(S3Store, "LEASE_S", 1.5)

    def expires():
        return json.loads(a.client.get_object(Bucket=a.bucket, Key=a.key("locks/y.lock"))["Body"].read())["expires"]

    with a.lock("locks/y.lock", timeout_s=1, purpose="long job"):
        first = expires()
        deadline = time.monotonic() + 30  # bounds a hang only
        while expires() == first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert expires() > first  # the holder pushed its expiry on
        with pytest.raises(StoreError, match="long job"):
            with b.lock("locks/y.lock", timeout_s=0):
                pass


def test_a_skewed_clock_alone_does_not_end_a_live_lease(pair, monkeypatch):
    a, b = pair
    monkeypatch.setattr(S3Store, "LEASE_S", 3.0)
    real_time = time.time
    with a.lock("locks/skew.lock", timeout_s=1, purpose="live holder"):
        # the waiter's wall clock runs an hour ahead: every expiry looks past, but the holder renews
        monkeypatch.setattr(st.time, "time", lambda: real_time() + 3600)
        with pytest.raises(StoreError, match="live holder"):
            with b.lock("locks/skew.lock", timeout_s=4):
                pass
        monkeypatch.setattr(st.time, "time", real_time)


def test_a_holder_that_loses_its_lease_is_told(pair, monkeypatch):
    a, b = pair
    monkeypatch.setattr(S3Store, "LEASE_S", 1.5)
    with pytest.raises(StoreError, match="lost while held: taken over"):
        with a.lock("locks/lost.lock", timeout_s=1, purpose="slow"):
            [renewer] = [t for t in threading.enumerate() if t.name == "lease-locks/lost.lock"]
            # another writer replaces the lease (as a takeover after a store outage would)
            a.client.put_object(Bucket=a.bucket, Key=a.key("locks/lost.lock"), Body=json.dumps(
                {"token": "other", "pid": 2, "host": "h2", "since": "now", "expires": time.time() + 60}).encode())
            renewer.join(timeout=30)  # its next renewal finds the lease gone and stops; the bound is for a hang
            assert not renewer.is_alive()
    # the other writer's lease is left alone
    assert json.loads(a.client.get_object(Bucket=a.bucket, Key=a.key("locks/lost.lock"))["Body"].read())["token"] == "other"
