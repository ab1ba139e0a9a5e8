"""The promotion decision without Airflow (nightshift.promotion.promote_candidate): minimum
evidence, the paired comparison with the champion, a run on other data waiting for a person,
and a retried promote that records the champion's move exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nightshift import contracts, registry, state
from nightshift.promotion import data_changes, data_identity, promote_candidate

CLASSES = ["a", "b", "c", "d"]
H, W = 4, 4
#: Every threshold, passable by a good candidate; per test a few are changed.
T = {"min_accuracy": 0.5, "max_p95_latency_ms": 100, "max_p99_latency_ms": 100, "min_throughput_rps": 1,
     "served_accuracy_tolerance": 0.01, "champion_tolerance": 0.01, "champion_relative_tolerance": 0.02,
     "min_test_images": 50, "champion_alpha": 0.05}


def make_snapshot(root: Path, *, n: int = 400, source: dict | None = None, classes=CLASSES, seed: int = 0):
    """``n`` distinct 4x4 images; class k lights pixel k (the rest is noise in pixels 8..15).
    Half of them are test images (hash-based split)."""
    from nightshift.data.snapshot import write_snapshot
    from nightshift.data.sources import SourceData

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(classes)
    images = np.zeros((n, H, W, 1), np.uint8)
    flat = images.reshape(n, -1)
    flat[np.arange(n), labels] = 255
    flat[:, 8:] = rng.integers(0, 100, size=(n, 8))
    data = SourceData(images=images, labels=labels.astype(np.int64), class_names=list(classes),
                      orig_sizes=np.tile([H, W, 1], (n, 1)), origins=[f"img{i}" for i in range(n)],
                      source=source or {"kind": "imagefolder", "root": "/data/photos"})
    return write_snapshot(data, root, val_fraction=0.1, test_fraction=0.5)


def write_model(path: Path, *, wrong_class: int | None = None, classes=CLASSES) -> Path:
    """A linear ONNX model that reads the lit pixel: right on every image, or (``wrong_class``)
    wrong on every image of that class."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = len(classes)
    w = np.zeros((H * W, k), np.float32)
    w[np.arange(k), np.arange(k)] = 1.0
    if wrong_class is not None:
        w[wrong_class] = np.roll(w[wrong_class], 1)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("Reshape", ["x", "shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "linear", [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", H, W, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k])],
        initializer=[numpy_helper.from_array(np.array([-1, H * W], np.int64), "shape"),
                     numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"class_names": json.dumps(list(classes))})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


class World:
    """An MLflow store, an artifact root, and candidates made of real runs and ONNX files."""

    def __init__(self, home: Path, c, model: str):
        self.home = home
        self.root = home / "artifacts"
        self.c = c
        self.model = model
        self.count = 0

    def candidate(self, snap, *, wrong_class: int | None = None, classes=CLASSES, partition_window=None) -> dict:
        import hashlib

        from nightshift.scoring import score_onnx

        self.count += 1
        model_dir = self.home / f"model{self.count}" / "onnx"
        onnx_path = write_model(model_dir / "model.onnx", wrong_class=wrong_class, classes=classes)
        with registry.training_run(self.c, "exp", f"r{self.count}", tags={}, params={},
                                   artifact_location=(self.home / "mlruns").as_uri()) as run_id:
            registry.log_artifacts(self.c, run_id, model_dir, "onnx")
        acc = score_onnx(onnx_path, snap.iter_split("test"), class_names=snap.class_names)
        sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
        return {
            "snapshot": {"snapshot_uri": str(snap.path), "collection_id": snap.collection_id,
                         "partition_window": partition_window},
            "training": {"run_id": run_id, "metrics": {"test_accuracy": acc["accuracy"]}, "data_digest": snap.digest},
            "export": {"onnx_path": str(onnx_path), "onnx_sha256": sha, "parity": {"passed": True}},
            "image": {"image": f"nightshift/m:{sha[:12]}"},
            "system_eval": {"accuracy": acc["accuracy"], "n": acc["n"], "errors": 0,
                            "latency_ms": {"p95": 1.0, "p99": 2.0}, "throughput_rps": 1000.0},
            "validation": {"success": True},
        }

    def promote(self, cand: dict, *, run_id: str, **kw) -> dict:
        kw.setdefault("overrides", T)
        return promote_candidate(self.c, model_name=self.model, **cand, gates_file=kw.pop("gates_file", ""),
                                 run_id=run_id, dag_id="nightly_retrain", run_dir=self.root / "runs" / run_id,
                                 artifact_root=self.root, **kw)

    def history(self) -> list[dict]:
        return list(state.read_jsonl(contracts.history_path(self.root, self.model)))

    def champion(self) -> str | None:
        cur = registry.get_champion(self.c, self.model)
        return cur["version"] if cur else None

    def tags(self, version: str) -> dict[str, str]:
        return self.c.get_model_version(self.model, version).tags


@pytest.fixture(scope="module")
def mlflow_client(tmp_path_factory):
    """One MLflow store for the module (creating one takes seconds); each test has its own model."""
    return registry.client(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


@pytest.fixture
def world(tmp_path, mlflow_client, request):
    import hashlib

    return World(tmp_path, mlflow_client, "m-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12])


@pytest.fixture
def snap(tmp_path):
    return make_snapshot(tmp_path / "snapshots")


def test_first_candidate_is_promoted_with_its_evidence_and_data_recorded(world, snap):
    out = world.promote(world.candidate(snap), run_id="r1")
    assert out["promoted"] is True and out["champion"] == out["version"] and out["data_changed"] == []
    n = snap.count("test")
    assert n >= T["min_test_images"]
    ev = out["evidence"]
    assert ev["test_images"] == n and ev["min_test_images"] == 50 and "Wilson" in ev["meaning"]
    lo, hi = ev["accuracies"]["offline_accuracy"]["ci95"]
    assert lo < 1.0 == hi and ev["accuracies"]["offline_accuracy"]["n"] == n
    assert f"{n} test images" in out["reason"] and "95% CI" in out["reason"]
    tags = world.tags(out["version"])
    assert json.loads(tags["nightshift.data_source"]) == {"kind": "imagefolder", "root": "/data/photos"}
    assert json.loads(tags["nightshift.data_classes"]) == CLASSES and tags["nightshift.partition_window"] == "none"
    assert json.loads(tags["gate.offline_accuracy"])["n"] == n
    saved = json.loads(Path(out["report_path"]).read_text())
    assert saved["evidence"]["accuracies"]["offline_accuracy"]["ci95"] == [lo, hi]
    (event,) = world.history()
    assert event["action"] == "promoted"
    assert event["key"] == f"nightly_retrain/r1/{world.model}/v{out['version']}/promoted"


def test_a_small_test_split_is_not_enough_evidence_even_for_a_perfect_tie(world, tmp_path):
    """Five-ish test images: every accuracy gate fails, whatever the accuracies are."""
    small = make_snapshot(tmp_path / "small", n=12)
    first = world.promote(world.candidate(small), run_id="r1", overrides=T | {"min_test_images": 1})
    assert first["promoted"] is True  # a champion, so that vs_champion compares
    tie = world.promote(world.candidate(small), run_id="r2")  # the same model again: a perfect tie
    n = small.count("test")
    assert n < 50
    assert tie["promoted"] is False and tie["decision"] == "NOT_BLESSED"
    failed = {g["name"]: g["detail"] for g in tie["gates"] if not g["passed"]}
    assert set(failed) == {"offline_accuracy", "served_accuracy", "vs_champion"}
    for detail in failed.values():
        assert f"not enough evidence: {n} " in detail and "< min_test_images 50" in detail
    assert world.history()[-1]["action"] == "rejected"


def test_a_candidate_significantly_worse_on_the_same_images_fails_inside_the_tolerances(world, snap):
    world.promote(world.candidate(snap), run_id="r1")
    loose = T | {"champion_tolerance": 1.0, "champion_relative_tolerance": 1.0, "min_accuracy": 0.1,
                 "served_accuracy_tolerance": 1.0}
    worse = world.candidate(snap, wrong_class=0)  # wrong on a quarter of the images
    out = world.promote(worse, run_id="r2", overrides=loose)
    gate = next(g for g in out["gates"] if g["name"] == "vs_champion")
    assert out["promoted"] is False and not gate["passed"]
    obs = gate["observed"]
    assert obs["candidate_only_correct"] == 0 and obs["champion_only_correct"] > 20 and obs["mcnemar_p"] < 1e-6
    assert "McNemar exact p=" in gate["detail"] and "significantly worse" in gate["detail"]
    assert out["evidence"]["paired"]["mcnemar_p"] == obs["mcnemar_p"]
    # with the paired test off (alpha 0, a looser policy) only the tolerances decide
    off = world.promote(world.candidate(snap, wrong_class=0), run_id="r3", overrides=loose | {"champion_alpha": 0})
    assert next(g for g in off["gates"] if g["name"] == "vs_champion")["passed"] is True


def test_an_equal_candidate_passes_vs_champion_with_its_pairs_reported(world, snap):
    world.promote(world.candidate(snap), run_id="r1")
    out = world.promote(world.candidate(snap), run_id="r2")
    gate = next(g for g in out["gates"] if g["name"] == "vs_champion")
    assert out["promoted"] is True and gate["passed"]
    assert gate["observed"]["mcnemar_p"] == 1.0 and gate["observed"]["champion_only_correct"] == 0
    assert out["same_split_scores"]["both"] == snap.count("test")


@pytest.mark.parametrize("change, match, decision", [
    ({"source": {"kind": "imagefolder", "root": "/data/hand-picked"}},
     "source: this run reads imagefolder /data/hand-picked, champion", "BLESSED"),
    ({"partition_window": 1}, "partition_window: this run uses the last 1 partition(s), champion", "BLESSED"),
    # the champion cannot be scored on other labels: vs_champion fails closed, the change is recorded too
    ({"classes": ["a", "b", "c", "e"]}, "classes: this run has 4 [a, b, c, e]", "NOT_BLESSED"),
])
def test_a_run_on_other_data_waits_for_a_person(world, snap, tmp_path, change, match, decision):
    world.promote(world.candidate(snap), run_id="r1")
    champion = world.champion()
    other = snap
    if "source" in change or "classes" in change:
        other = make_snapshot(tmp_path / "other", source=change.get("source"),
                              classes=change.get("classes", CLASSES))
    cand = world.candidate(other, classes=other.class_names, partition_window=change.get("partition_window"))
    out = world.promote(cand, run_id="r2")
    assert out["decision"] == decision, out["reason"]
    assert out["promoted"] is False and world.champion() == champion
    (why,) = out["data_changed"]
    assert match in why and f"champion v{champion}" in why
    if out["decision"] == "BLESSED":  # a run on other data that passes every gate: a person decides
        assert out["awaiting_approval"] is True and out["approval_reasons"] == [f"data changed: {why}"]
        assert "data differs from champion" in out["reason"] and why in out["reason"]
        assert world.history()[-1]["action"] == "awaiting_approval"
        assert world.tags(out["version"])["nightshift.awaiting_approval"] == "true"
    # the retry keeps the first decision and says why again
    again = world.promote(cand, run_id="r2")
    assert again["reused"] is True and again["data_changed"] == out["data_changed"]
    assert world.champion() == champion


def test_the_same_data_with_new_partitions_is_not_a_change():
    manifest = {"source": {"kind": "imagefolder", "root": "/d", "partitions": ["2026-12-01"]}, "class_names": ["a"]}
    mine = data_identity(manifest, 7)
    assert mine == {"source": {"kind": "imagefolder", "root": "/d"}, "classes": ["a"], "partition_window": 7}
    tags = {"nightshift.data_source": json.dumps({"kind": "imagefolder", "root": "/d"}),
            "nightshift.data_classes": json.dumps(["a"]), "nightshift.partition_window": "7"}
    assert data_changes(mine, {"version": "3", "tags": tags}) == []
    assert data_changes(mine, None) == []  # the very first run: nothing to compare with
    assert data_changes(data_identity(manifest, "7"), {"version": "3", "tags": tags}) == []  # templated "7"


def test_a_champion_without_data_tags_counts_as_other_data(world, snap):
    (why,) = data_changes(data_identity(snap.manifest), {"version": "3", "tags": {"nightshift.decision": "BLESSED"}})
    assert "champion v3 does not record its training data" in why and "nightshift.data_source" in why
    world.promote(world.candidate(snap), run_id="r1")
    v = world.champion()
    world.c.delete_model_version_tag(world.model, v, "nightshift.data_source")  # as registered by an older Nightshift
    out = world.promote(world.candidate(snap), run_id="r2")
    assert out["awaiting_approval"] is True and out["promoted"] is False
    assert "does not record its training data" in out["data_changed"][0]


def test_a_retried_promote_whose_first_try_moved_champion_records_the_move_once(world, snap, monkeypatch):
    """The first try registers the version and moves champion, then dies before the history line;
    the retry finds the version, keeps its decision and writes the event, exactly once."""
    import nightshift.state as state_mod

    world.promote(world.candidate(snap), run_id="r1")
    cand = world.candidate(snap)
    real = state_mod.append_history
    calls = []

    def crash(root, event):
        calls.append(event)
        raise KeyboardInterrupt("worker killed between the alias move and the history line")

    monkeypatch.setattr(state_mod, "append_history", crash)
    with pytest.raises(KeyboardInterrupt):
        world.promote(cand, run_id="r2")
    monkeypatch.setattr(state_mod, "append_history", real)
    moved_to = world.champion()
    assert calls and calls[0].version == moved_to  # the alias moved in the first try
    assert [e["action"] for e in world.history()] == ["promoted"]  # ... and nothing says so yet

    retry = world.promote(cand, run_id="r2")
    assert retry["reused"] is True and retry["promoted"] is True and retry["version"] == moved_to
    again = world.promote(cand, run_id="r2")  # a third try
    assert again["reused"] is True
    events = world.history()
    assert [e["action"] for e in events] == ["promoted", "promoted"]
    assert events[-1]["version"] == moved_to and events[-1]["previous_champion"] == events[0]["version"]
    assert events[-1]["run_id"] == "r2"


def test_history_append_is_idempotent_per_run_and_always_appends_runless_events(tmp_path):
    ev = dict(model="m", action="promoted", version="2", previous_champion="1", champion="2", reason="x")
    for _ in range(3):
        state.append_history(tmp_path, contracts.HistoryEvent(**ev, dag_id="d", run_id="r"))
    state.append_history(tmp_path, contracts.HistoryEvent(**ev, dag_id="d", run_id="r2"))  # another run
    state.append_history(tmp_path, contracts.HistoryEvent(**ev))  # no run: no key
    state.append_history(tmp_path, contracts.HistoryEvent(**ev))
    path = contracts.history_path(tmp_path, "m")
    with open(path, "ab") as f:
        f.write(b'{"torn": ')  # a writer killed mid-line
    state.append_history(tmp_path, contracts.HistoryEvent(**(ev | {"action": "rejected"}), run_id="r"))
    events = list(state.read_jsonl(path))
    assert [(e["run_id"], e["action"]) for e in events] == [
        ("r", "promoted"), ("r2", "promoted"), (None, "promoted"), (None, "promoted"), ("r", "rejected")]


def test_a_threshold_param_below_the_gate_files_minimum_evidence_waits_for_approval(world, snap, tmp_path):
    import yaml

    gates = tmp_path / "gates.yaml"
    gates.write_text(yaml.safe_dump({"thresholds": T | {"min_test_images": 1000}}))
    strict = world.promote(world.candidate(snap), run_id="r1", gates_file=str(gates), overrides={})
    assert strict["promoted"] is False and "< min_test_images 1000" in strict["reason"]
    loosened = world.promote(world.candidate(snap), run_id="r2", gates_file=str(gates),
                             overrides={"min_test_images": 10})
    assert loosened["awaiting_approval"] is True and loosened["promoted"] is False
    assert any(w.startswith("min_test_images=10") for w in loosened["loosened_thresholds"])
    # the file without the setting: nothing is promoted, and the reason names it
    gates.write_text(yaml.safe_dump({"thresholds": {k: v for k, v in T.items() if k != "min_test_images"}}))
    missing = world.promote(world.candidate(snap), run_id="r3", gates_file=str(gates), overrides={})
    assert missing["promoted"] is False and "no threshold is configured for: min_test_images" in missing["reason"]


def test_paired_counts_and_per_image_hits(snap, tmp_path):
    from nightshift.scoring import ScoringError, paired_counts, score_onnx

    good = score_onnx(write_model(tmp_path / "g.onnx"), snap.iter_split("test"), class_names=CLASSES)
    bad = score_onnx(write_model(tmp_path / "b.onnx", wrong_class=1), snap.iter_split("test"), class_names=CLASSES)
    assert good["hits"].all() and good["hits"].shape == (snap.count("test"),)
    assert int(bad["hits"].sum()) == bad["correct"]
    t = paired_counts(good["hits"], bad["hits"])
    assert t["candidate_only"] == 0 and t["champion_only"] == snap.count("test") - bad["correct"]
    assert sum(t.values()) == snap.count("test")
    with pytest.raises(ScoringError, match="different images"):
        paired_counts(good["hits"], bad["hits"][:-1])


def test_a_torchvision_subset_is_other_data(tmp_path):
    """The manifest records the dataset's limit and options: a run on the first 300 images of
    the champion's dataset is other data, so a person decides."""
    from nightshift.data.sources import load_torchvision

    full = load_torchvision("FakeData", tmp_path, (8, 8, 1), options={"size": 40, "num_classes": 3}).source
    subset = load_torchvision("FakeData", tmp_path, (8, 8, 1), limit=12,
                              options={"size": 40, "num_classes": 3}).source
    assert subset["limit"] == 12 and full["limit"] is None and full["options"] == {"size": 40, "num_classes": 3}
    champion = {"version": "3", "tags": {
        "nightshift.data_source": json.dumps(data_identity({"source": full, "class_names": ["0", "1", "2"]})["source"]),
        "nightshift.data_classes": json.dumps(["0", "1", "2"]), "nightshift.partition_window": "none"}}
    same = data_identity({"source": full, "class_names": ["0", "1", "2"]})
    assert data_changes(same, champion) == []
    (why,) = data_changes(data_identity({"source": subset, "class_names": ["0", "1", "2"]}), champion)
    assert why.startswith("source:")


def test_served_model_accuracy_is_the_int8_models_when_it_serves():
    from nightshift.promotion import served_model_accuracy

    train = {"metrics": {"test_accuracy": 0.97}}
    kept = {"variant": "int8", "quantization": {"kept": True, "int8_accuracy": 0.962, "fp32_accuracy": 0.97}}
    assert served_model_accuracy(train, kept) == 0.962
    assert served_model_accuracy(train, {"variant": "fp32", "quantization": {"kept": False, "int8_accuracy": 0.5}}) == 0.97
    assert served_model_accuracy(train, {}) == 0.97
