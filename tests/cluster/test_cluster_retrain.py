"""``nightly_retrain`` on the cluster profile, its artifact root in object storage.

One private profile (``scripts/cluster/cluster.py up``: Postgres, Redis, SeaweedFS's S3 gateway,
an MLflow server, Airflow with the CeleryExecutor, ``worker-default`` on queues default+docker and
``worker-gpu`` on queue gpu, each in folders of its own) with the project's real ``dags/``. The
DAG runs are triggered through the REST API as a user would.

1. ``test_nightly_retrain_on_object_storage``: a run on the bundled digits deploys with Docker;
   every task succeeds on the worker its queue names; the run's files, the snapshot shards and
   the shared state are objects in the bucket; every component's artifact root is ``s3://``
   and no two share a folder; a file one worker wrote is in the other's working copy only as a
   copy of the bucket's object; the champion alias moved on the MLflow server and the port
   serves it.
2. ``test_worker_killed_mid_training_resumes_from_the_store``: ``worker-gpu`` is SIGKILLed while
   ``train_gpu`` is mid-training (once its first ``last.pt`` is in the bucket), its working copy
   is thrown away (a replacement node), it is restarted with ``cluster.py restart``; the retry
   resumes from the checkpoint in the bucket, the run succeeds with exactly one new version, and
   the killed try's MLflow run is ended as KILLED, tagged with the try that superseded it.
   (The test clears the task once the scheduler has set it up for retry, rather than waiting
   out the DAG's 2-minute ``retry_delay``.)
3. ``test_served_drift_retrains_and_rollback_restores``: the closed loop. Shifted traffic to the
   served champion; ``drift_monitor`` detects it and emits the drift Asset; the scheduler makes the
   asset-triggered ``nightly_retrain`` run of it, which trains on the model's own entry, registers a
   new version, passes the model's gates and deploys it; ``rollback_model`` then puts the champion
   before it back, and the port serves that again.

The profile's models file (``$NIGHTSHIFT_MODELS_FILE``, written by the fixture) has one entry, the
test's model: the default model, so its Dags keep the ids ``nightly_retrain`` / ``drift_monitor``, with
its own port, recipe and gate file, and ``schedule: null`` / ``drift.schedule: null``, so the real
scheduler (``use_job_schedule`` on, as in production) starts no timed run when the tests unpause the
Dags, and makes runs of the drift Asset only. The heartbeat timeout is 30 s.
``NIGHTSHIFT_TEST_KEEP_CLUSTER=1`` keeps the profile's folder (logs, working copies) afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from datetime import UTC
from pathlib import Path

import pytest
from nightshift.containers import free_port_pair

from tests.cluster import harness
from tests.cluster.harness import BUCKET, PREFIX, Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.integration, pytest.mark.docker]

DAG_ID = "nightly_retrain"
TOKEN = secrets.token_hex(3)
MODEL = f"cluster-digits-{TOKEN}"
WORKERS = ("worker-default", "worker-gpu")
CONTROL = ("api-server", "scheduler", "dag-processor", "triggerer")
#: queue -> the worker that serves it (scripts/cluster/cluster.py WORKERS)
QUEUE_WORKER = {"default": "worker-default", "docker": "worker-default", "gpu": "worker-gpu"}
DOCKER_TASKS = ("build_inference_image", "system_eval", "finalize_promotion", "deploy")
HEARTBEAT_TIMEOUT_S = 30
#: the test model's serving port (its models-file entry's deploy.port); the next one serves gRPC
PORT = free_port_pair()
#: the test model's recipe in its entry: what the drift-triggered run trains with (nobody passes conf)
ENTRY_EPOCHS = 6
#: what the later tests use of the first one (its port, its champion)
STATE: dict = {}


def write_models_file(folder: Path) -> Path:
    """The profile's models file: the test's model as the one (default) entry, with its own gate file.

    ``schedule: null`` and ``drift.schedule: null``: no timed runs (unpausing starts nothing), the drift
    Asset only. ``retrain_cooldown_hours: 0``: the drift retrain follows runs minutes old. The gate file
    keeps the project's absolute floors (accuracy, latency, throughput, served vs offline) and lets a
    candidate that meets them replace the champion whatever their comparison (``champion_tolerance`` 1,
    no paired test): the loop needs a second champion to roll back from, and a 6-epoch candidate may
    score a little under the fault test's 30-epoch one."""
    import yaml

    gates = yaml.safe_load((harness.ROOT / "include" / "gates.yaml").read_text())
    gates["thresholds"].update(champion_tolerance=1.0, champion_relative_tolerance=1.0, champion_alpha=0)
    (folder / "gates.yaml").write_text(yaml.safe_dump(gates))
    entry = {"name": MODEL, "default": True, "source": "bundled", "schedule": None,
             "recipe": {"model": "auto", "epochs": ENTRY_EPOCHS}, "gates": "gates.yaml",
             "deploy": {"target": "docker", "port": PORT}, "retrain_cooldown_hours": 0,
             "drift": {"schedule": None, "min_rows": 100}}
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}, sort_keys=False))
    from nightshift.model_config import load_models

    assert load_models(path).errors == (), load_models(path).error_report()
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    harness.require_docker()
    models = write_models_file(tmp_path_factory.mktemp("cluster-models"))
    c = harness.start("cluster-retrain-", {
        "NIGHTSHIFT_CLUSTER_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
        "NIGHTSHIFT_MODELS_FILE": str(models),  # every component parses the Dags from it
        "NIGHTSHIFT_REQUEST_LOG_ROTATE_S": "1",  # the serving container publishes its request log at once
    })
    try:
        c.wait_parsed(DAG_ID)
        yield c
    finally:
        harness.remove_model_containers(MODEL)
        harness.stop(c)


# ------------------------------------------------------------------------------------------ helpers
def _cache_root(c: Cluster, worker: str) -> Path:
    """``worker``'s working copy of the artifact root (its NIGHTSHIFT_HOME/artifact-cache/<bucket>/<prefix>)."""
    env = c.environ(worker)
    assert "NIGHTSHIFT_ARTIFACT_CACHE" not in env, env.get("NIGHTSHIFT_ARTIFACT_CACHE")
    return Path(env["NIGHTSHIFT_HOME"]) / "artifact-cache" / BUCKET / PREFIX


def _files(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): p for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith((".lock", ".tmp"))}


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


# ------------------------------------------------------------------------------------------ tests
def test_nightly_retrain_on_object_storage(cluster: Cluster):
    c = cluster
    port = PORT
    run_id = f"cluster_retrain_{TOKEN}"
    conf = {"model_name": MODEL, "source": "bundled", "epochs": 6, "deploy_target": "docker", "deploy_port": port}
    t0 = time.monotonic()
    c.trigger(DAG_ID, conf, run_id)
    state, tis = c.wait_run(DAG_ID, run_id, timeout=420)
    took = time.monotonic() - t0
    assert state == "success", f"run {run_id}: {state} after {took:.0f}s\n{harness.describe(tis)}\n{c.logs()}"
    # every task succeeded; approve_promotion skips itself when no approval is required
    expected = {k: "skipped" if k == "approve_promotion" else "success" for k in tis}
    assert {k: v["state"] for k, v in tis.items()} == expected, harness.describe(tis)

    # -- where each task ran: the queue its placement names, and the log in that worker's own folder
    queues = {k: v["queue"] for k, v in tis.items()}
    assert queues["train_gpu"] == "gpu", queues
    for task in DOCKER_TASKS:
        assert queues[task] == "docker", queues
    for task, queue in queues.items():
        worker = QUEUE_WORKER[queue]
        other = next(w for w in WORKERS if w != worker)
        assert c.task_logs(worker, DAG_ID, run_id, task), (task, queue, worker)
        assert not c.task_logs(other, DAG_ID, run_id, task), (task, "ran on", other)

    # -- every component's artifact root is the bucket; no two share a folder
    envs = {name: c.environ(name) for name in (*CONTROL, *WORKERS)}
    for name, env in envs.items():
        assert env["NIGHTSHIFT_ARTIFACT_ROOT"] == f"s3://{BUCKET}/{PREFIX}", (name, env["NIGHTSHIFT_ARTIFACT_ROOT"])
        assert env["NIGHTSHIFT_ARTIFACT_CONN_ID"] == "nightshift_s3"
        assert env["MLFLOW_TRACKING_URI"] == c.mlflow_uri
    homes = {name: Path(env["NIGHTSHIFT_HOME"]) for name, env in envs.items()}
    for a, home_a in homes.items():
        for b, home_b in homes.items():
            if a < b:
                assert not _overlap(home_a, home_b), (a, b, home_a, home_b)
    wdirs = {w: [Path(envs[w][k]) for k in ("AIRFLOW_HOME", "TMPDIR", "NIGHTSHIFT_HOME", "NIGHTSHIFT_WHEELHOUSE")]
             + [Path(os.readlink(f"/proc/{c.pid(w)}/cwd"))] for w in WORKERS}
    for a in wdirs["worker-default"]:
        for b in wdirs["worker-gpu"]:
            assert not _overlap(a, b), (a, b)

    # -- tasks handed each other URIs: no XCom names a folder of the cluster (a worker's working copy)
    xcoms = {t: c.xcom(DAG_ID, run_id, t) for t in ("collect_data", "train_gpu", "export_onnx", "promote")}
    for task, value in xcoms.items():
        local = [s for s in _strings(value) if str(c.home) in s]
        assert not local, (task, local)
    snapshot_uri = xcoms["collect_data"]["snapshot_uri"]
    assert snapshot_uri.startswith(f"s3://{BUCKET}/{PREFIX}/snapshots/"), snapshot_uri

    # -- the run's artifacts, the snapshot's shards and the shared state are objects in the bucket
    folder = c.run_folder(DAG_ID, run_id)
    run_keys = {k[len(folder):] for k in c.keys(BUCKET, folder)}
    for rel in ("run.json", "promotion.json", "validation/validation.json", "train/checkpoint.pt",
                "train/train_manifest.json", "model/model.onnx", "system_eval/system_eval.json",
                "drift/drift_report.json"):
        assert rel in run_keys, (rel, sorted(run_keys))
    promotion = json.loads(c.object(folder + "promotion.json"))
    shards = [k for k in c.keys(BUCKET, f"{PREFIX}/snapshots/shards/") if k.endswith("/images.npy")]
    assert shards, c.keys(BUCKET, f"{PREFIX}/snapshots/")
    assert c.keys(BUCKET, f"{PREFIX}/deployments/{MODEL}/"), "no deployment state in the bucket"
    assert c.keys(BUCKET, f"{PREFIX}/registry/{MODEL}/"), "no promotion history in the bucket"

    # -- working copies: a file one worker wrote reaches the other only as a copy of the bucket's object
    caches = {w: _files(_cache_root(c, w)) for w in WORKERS}
    checkpoint = f"{folder[len(PREFIX) + 1:]}train/checkpoint.pt"
    model = f"{folder[len(PREFIX) + 1:]}model/model.onnx"
    assert checkpoint in caches["worker-gpu"], "train_gpu's checkpoint is not in worker-gpu's working copy"
    assert checkpoint in caches["worker-default"], "export_onnx (worker-default) did not fetch the checkpoint"
    assert model in caches["worker-default"]
    assert model not in caches["worker-gpu"], "worker-gpu has model.onnx, which only worker-default wrote"
    shard_rel = [k[len(PREFIX) + 1:] for k in shards]
    assert any(s in caches["worker-gpu"] for s in shard_rel), "train_gpu did not fetch the snapshot shards"
    common = set(caches["worker-default"]) & set(caches["worker-gpu"])
    assert checkpoint in common
    for rel in sorted(common):
        body = c.object(f"{PREFIX}/{rel}")  # raises NoSuchKey: shared without going through the bucket
        for w in WORKERS:
            assert harness.sha(caches[w][rel].read_bytes()) == harness.sha(body), (w, rel)

    # -- the registry: one version, champion on the server, its MLflow run's artifacts on the server
    versions = c.versions(MODEL)
    assert len(versions) == 1, [v.version for v in versions]
    champion = c.champion(MODEL)
    assert champion.version == versions[0].version
    assert promotion["promoted"] is True and promotion["version"] == champion.version, promotion
    from mlflow.tracking import MlflowClient

    mlrun = MlflowClient(tracking_uri=c.mlflow_uri).get_run(champion.run_id)
    assert not mlrun.info.artifact_uri.startswith("file:"), (
        f"the MLflow run's artifacts are in a worker's folder: {mlrun.info.artifact_uri}")

    # -- the port serves the champion
    import requests

    r = requests.get(f"http://127.0.0.1:{port}/v2/models/{MODEL}", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["versions"][0] == champion.tags["nightshift.onnx_sha256"][:12]
    STATE.update(port=port, champion=champion.version, run_s=took)
    print(f"\ncluster: started in {c.start_s:.0f}s; nightly_retrain ({run_id}) took {took:.0f}s")


def test_worker_killed_mid_training_resumes_from_the_store(cluster: Cluster):
    c = cluster
    before = {v.version for v in c.versions(MODEL)}
    run_id = f"cluster_fault_{TOKEN}"
    # long enough to be killed mid-training after its first last.pt (about 0.5 s an epoch on an idle
    # 2-core machine), short enough that the resumed rest is quick
    epochs = 30
    # the port the first test deployed on (the champion stays behind one stable port); alone, no deploy
    conf = {"model_name": MODEL, "source": "bundled", "epochs": epochs, "batch_size": 64,
            "deploy_target": "docker" if "port" in STATE else "none", "deploy_port": STATE.get("port", 8600)}
    t0 = time.monotonic()
    c.trigger(DAG_ID, conf, run_id)

    # 1. wait for train_gpu to be mid-training: its first last.pt is an object in the bucket
    last_key = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        ti = c.tis(DAG_ID, run_id).get("train_gpu", {})
        assert ti.get("state") not in ("success", "failed", "up_for_retry"), (
            f"train_gpu ended ({ti.get('state')}) before a last.pt reached the bucket: is the resume checkpoint "
            f"published after every epoch?\n{c.logs()}")
        if ti.get("state") == "running":
            keys = [k for k in c.keys(BUCKET, f"{PREFIX}/runs/{DAG_ID}/{run_id}") if k.endswith("/train/last.pt")]
            if keys:
                last_key = keys[0]
                break
        time.sleep(0.5)
    assert last_key, f"no last.pt in the bucket within 240s\n{harness.describe(c.tis(DAG_ID, run_id))}\n{c.logs()}"
    killed_at = time.monotonic()

    # 2. SIGKILL worker-gpu's whole process tree (the worker, its pool, the task's supervisor and runner)
    pid = c.pid("worker-gpu")
    tree = c.kill("worker-gpu")
    assert len(tree) > 2, tree  # the worker, its pool process, the task
    # the replacement node has none of the old one's working copy: the retry must fetch from the bucket
    shutil.rmtree(c.home / "worker-gpu" / "home" / "nightshift" / "artifact-cache", ignore_errors=True)

    # 3. restart the worker with the profile's own script
    r = c.cli("restart", "worker-gpu", timeout=300)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{c.logs()}"
    assert c.pid("worker-gpu") != pid

    # 4. the scheduler notices the missing heartbeats and sets train_gpu up for retry; clear it then, so
    #    the retry starts now rather than after the DAG's 2-minute retry_delay
    deadline = time.monotonic() + HEARTBEAT_TIMEOUT_S + 120
    state = None
    while time.monotonic() < deadline:
        state = c.tis(DAG_ID, run_id)["train_gpu"]["state"]
        if state in ("up_for_retry", "failed"):
            break
        time.sleep(1)
    assert state == "up_for_retry", f"train_gpu: {state} {time.monotonic() - killed_at:.0f}s after the kill\n{c.logs()}"
    detected_s = time.monotonic() - killed_at
    c.clear(DAG_ID, run_id, "train_gpu")

    # 5. the retry resumes from the bucket's last.pt, then the run goes on to success
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ti = c.tis(DAG_ID, run_id)["train_gpu"]
        if ti["state"] in ("success", "failed", "up_for_retry"):
            break
        time.sleep(2)
    assert ti["state"] == "success" and ti["try_number"] >= 2, f"{ti}\n{c.logs()}"
    folder = c.run_folder(DAG_ID, run_id)
    manifest = json.loads(c.object(folder + "train/train_manifest.json"))
    resumed = manifest.get("resumed_from_epoch")
    assert resumed is not None and 0 < resumed < epochs, {k: manifest.get(k) for k in ("resumed_from_epoch",
                                                                                       "resumed_from")}
    logs = c.task_logs("worker-gpu", DAG_ID, run_id, "train_gpu")
    assert 1 in logs and ti["try_number"] in logs, sorted(logs)
    assert "resuming from" in logs[ti["try_number"]], logs[ti["try_number"]][-3000:]
    state, tis = c.wait_run(DAG_ID, run_id, timeout=300)
    took = time.monotonic() - t0
    assert state == "success", f"run {run_id}: {state}\n{harness.describe(tis)}\n{c.logs()}"
    after = {v.version for v in c.versions(MODEL)}
    assert len(after - before) == 1, (sorted(before), sorted(after))
    # the killed try's MLflow run did not stay RUNNING: the retry ended it as KILLED, naming itself
    mlruns = c.mlflow().search_runs([c.mlflow().get_experiment_by_name(MODEL).experiment_id],
                                    filter_string=f"tags.`nightshift.run_id` = '{run_id}' and "
                                                  "tags.`nightshift.task` = 'train_gpu'")
    states = {r.data.tags.get("nightshift.try_number"): r for r in mlruns}
    assert sorted(states) == ["1", str(ti["try_number"])], {k: r.info.status for k, r in states.items()}
    killed, retry = states["1"], states[str(ti["try_number"])]
    assert (killed.info.status, retry.info.status) == ("KILLED", "FINISHED"), (killed.info, retry.info)
    assert killed.data.tags["nightshift.superseded_by_try"] == str(ti["try_number"]), killed.data.tags
    assert killed.data.tags["nightshift.superseded_by_run"] == retry.info.run_id
    print(f"\ncluster: worker-gpu killed after its first last.pt; detected in {detected_s:.0f}s; retry resumed "
          f"from epoch {resumed}/{epochs}; run took {took:.0f}s")


def test_served_drift_retrains_and_rollback_restores(cluster: Cluster, tmp_path):
    """The closed loop on the cluster: shifted traffic reaches the served champion, ``drift_monitor``
    (on the docker worker, next to the request log) detects it and emits the drift Asset; the scheduler
    makes the asset-triggered ``nightly_retrain`` run, which trains the model's entry, registers a new
    version, passes the model's gates (see :func:`write_models_file`) and deploys it; ``rollback_model``
    then moves champion back to the version before it, which serves again."""
    c = cluster
    if "port" not in STATE:
        pytest.skip("needs the deployment of test_nightly_retrain_on_object_storage")
    import requests
    from nightshift.data.snapshot import fetch_snapshot
    from nightshift.store import S3Options, open_store
    from simulate_traffic import main as simulate  # scripts/ is on pytest's path

    t0 = time.monotonic()
    port = STATE["port"]
    champion = c.champion(MODEL)
    before = {v.version for v in c.versions(MODEL)}
    served = requests.get(f"http://127.0.0.1:{port}/v2/models/{MODEL}", timeout=10).json()["versions"][0]
    assert served == champion.tags["nightshift.onnx_sha256"][:12]
    assert c.runs(DAG_ID, "asset_triggered") == [], "a drift retrain ran before any drift"
    assert c.runs(DAG_ID, "scheduled") == [], "the scheduler started a timed run of a model with schedule: null"

    # 1. shifted traffic, drawn from the champion's own snapshot (read from the bucket into a cache of ours)
    s = c.config["secrets"]
    store = open_store(f"s3://{BUCKET}/{PREFIX}", cache_dir=tmp_path / "cache", s3=S3Options(
        endpoint_url=f"http://127.0.0.1:{c.config['ports']['s3']}", region_name="us-east-1",
        access_key=s["s3_access_key"], secret_key=s["s3_secret_key"]))
    snapshot = fetch_snapshot(store, champion.tags["nightshift.snapshot_uri"])
    from datetime import datetime, timedelta

    start = datetime.now(UTC) - timedelta(seconds=1)
    assert simulate(["--url", f"http://127.0.0.1:{port}", "--model", MODEL, "--mode", "darker", "--n", "400",
                     "--snapshot", str(snapshot)]) == 0
    time.sleep(3)  # the request log's last rotation (NIGHTSHIFT_REQUEST_LOG_ROTATE_S=1)
    end = datetime.now(UTC) + timedelta(seconds=1)

    # 2. drift_monitor on the cluster: drift, and the Asset that schedules nightly_retrain
    c.wait_parsed("drift_monitor")
    drift_run = f"cluster_drift_{TOKEN}"
    c.trigger("drift_monitor", {"model_name": MODEL, "min_rows": 100, "window_start": start.isoformat(),
                                "window_end": end.isoformat()}, drift_run)
    state, tis = c.wait_run("drift_monitor", drift_run, timeout=240)
    assert state == "success", f"drift_monitor {drift_run}: {state}\n{harness.describe(tis)}\n{c.logs()}"
    assert tis["request_retrain"]["state"] == "success", harness.describe(tis)
    assert tis["check_served_drift"]["queue"] == "docker"
    assert c.task_logs("worker-default", "drift_monitor", drift_run, "check_served_drift")
    r = c.api("GET", "/assets/events", params={"source_dag_id": "drift_monitor", "source_run_id": drift_run})
    assert r.status_code == 200, r.text
    events = r.json()["asset_events"]
    assert len(events) == 1 and events[0]["extra"]["model_name"] == MODEL, events
    extra = events[0]["extra"]
    assert extra["drifted_share"] > 0 and str(extra["champion_version"]) == str(champion.version), extra
    # what it read and its report left the docker worker for the bucket
    checked = c.xcom("drift_monitor", drift_run, "check_served_drift")
    assert checked["drift_detected"] is True and checked["n_current"] >= 100, checked
    for k in ("request_window", "report_html"):
        assert checked[k].startswith(f"s3://{BUCKET}/{PREFIX}/"), (k, checked[k])
        assert c.keys(BUCKET, checked[k].removeprefix(f"s3://{BUCKET}/")), (k, checked[k])
    # and its point of the drift timeline (the Nightshift view reads it from any component)
    assert c.keys(BUCKET, f"{PREFIX}/drift/{MODEL}/timeline.jsonl"), "no drift timeline point in the bucket"

    # 3. the scheduler makes a run of the Asset event: asset_triggered, no conf, the event as its upstream
    deadline = time.monotonic() + 120
    while not (runs := c.runs(DAG_ID, "asset_triggered")) and time.monotonic() < deadline:
        time.sleep(1)
    assert len(runs) == 1, f"drift retrain runs: {runs}\n{c.logs()}"
    retrain = runs[0]
    run_id = retrain["dag_run_id"]
    assert retrain["run_type"] == "asset_triggered" and not retrain["conf"], retrain
    r = c.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/upstreamAssetEvents")
    assert r.status_code == 200, r.text
    assert [e["id"] for e in r.json()["asset_events"]] == [events[0]["id"]], r.json()
    state, tis = c.wait_run(DAG_ID, run_id, timeout=480)
    assert state == "success", f"drift retrain {run_id}: {state}\n{harness.describe(tis)}\n{c.logs()}"
    expected = {k: "skipped" if k == "approve_promotion" else "success" for k in tis}
    assert {k: v["state"] for k, v in tis.items()} == expected, harness.describe(tis)
    assert tis["train_gpu"]["queue"] == "gpu" and tis["deploy"]["queue"] == "docker", harness.describe(tis)
    # the run says which drift it answers (cooldown's XCom triggered_by, from the event's extra)
    (why,) = c.xcom(DAG_ID, run_id, "cooldown", key="triggered_by")
    assert (why["source_dag_id"], why["source_run_id"], why["model_name"]) == ("drift_monitor", drift_run, MODEL)
    assert why["drifted_share"] == extra["drifted_share"] and str(why["champion_version"]) == str(champion.version), why
    assert "triggered by drift" in c.task_logs("worker-default", DAG_ID, run_id, "cooldown")[1]

    # 4. it trained the model's entry (nobody passed Params), registered one version and passed the gates:
    #    the model's gate file promotes any candidate over the absolute floors (write_models_file)
    folder = c.run_folder(DAG_ID, run_id)
    manifest = json.loads(c.object(folder + "train/train_manifest.json"))
    assert manifest["hparams"]["epochs"] == ENTRY_EPOCHS, manifest["hparams"]
    after = {v.version for v in c.versions(MODEL)}
    (new,) = after - before
    promotion = json.loads(c.object(folder + "promotion.json"))
    assert promotion["version"] == new and promotion["promoted"] is True, promotion
    now = c.champion(MODEL)
    assert now.version == new, (now.version, new)
    served = requests.get(f"http://127.0.0.1:{port}/v2/models/{MODEL}", timeout=10).json()["versions"][0]
    assert served == now.tags["nightshift.onnx_sha256"][:12], "the entry's port does not serve the drift retrain"
    retrain_s = time.monotonic() - t0

    # 5. roll back: the champion before the drift retrain comes back, and serves again
    c.wait_parsed("rollback_model")
    rollback_run = f"cluster_rollback_{TOKEN}"
    c.trigger("rollback_model", {"model_name": MODEL, "target": "previous", "deploy_port": port,
                                 "reason": "drift in served traffic (cluster test)"}, rollback_run)
    state, tis = c.wait_run("rollback_model", rollback_run, timeout=240)
    assert state == "success", f"rollback_model {rollback_run}: {state}\n{harness.describe(tis)}\n{c.logs()}"
    back = c.champion(MODEL)
    assert back.version == champion.version, (back.version, champion.version)
    served = requests.get(f"http://127.0.0.1:{port}/v2/models/{MODEL}", timeout=10).json()["versions"][0]
    assert served == back.tags["nightshift.onnx_sha256"][:12]
    print(f"\ncluster: drift -> asset-triggered retrain {run_id} promoted v{new} in {retrain_s:.0f}s; rolled back "
          f"v{new} -> v{back.version} in {time.monotonic() - t0:.0f}s in all")
