"""The promotion decision of ``nightly_retrain``: one function from the run's
evidence to a registered model version, a decision and a history event.

:func:`promote_candidate` does what the ``promote`` task does, without Airflow
(the operator resolves its templates, calls it and pushes the outcome):

1. **Policy.** Thresholds from the gate file with the run's overrides on top
   (:mod:`nightshift.gates`); an override looser than the file makes a BLESSED
   candidate wait for a person.
2. **Retry.** A version already registered for this training run and ONNX file
   (an earlier try of the task) is resumed with its recorded decision; nothing
   is registered or decided twice.
3. **Evidence.** The candidate and the champion are scored on exactly today's
   test split, image by image (:func:`rescore`), so the comparison is paired
   (McNemar's exact test) and every accuracy comes with its number of images and
   a Wilson 95 % interval.
4. **Data.** The run's data identity (source, class list, partition window) is
   compared with the champion's (recorded as version tags at registration): a
   run on other data is a policy change and waits for a person
   (:func:`data_changes`).
5. **Registration** of the version with every gate as a tag; ``champion`` moves
   only for a BLESSED candidate that needs no approval.
6. **History.** The outcome is written to ``promotion.json`` in the run folder
   and appended to the promotion history, always, idempotently: a retry whose
   first try moved the champion but died before the history line writes it
   exactly once (:func:`nightshift.contracts.append_history`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from nightshift.champion import champion_lock

log = logging.getLogger(__name__)

#: What the numbers in ``promotion.json`` mean; also written there (``evidence.meaning``).
EVIDENCE_MEANING = (
    "Each accuracy is measured on the n images of today's test split and shown with its 95% Wilson "
    "interval: the range of true accuracies compatible with what was seen (5 of 5 right is 0.57-1.0). "
    "Every accuracy gate needs at least min_test_images test images, else it fails as 'not enough "
    "evidence'. vs_champion scores candidate and champion on the same images: it fails when the "
    "candidate's drop exceeds champion_tolerance or champion_relative_tolerance, or when McNemar's exact "
    "test on the images only one of them classifies correctly gives p < champion_alpha with more "
    "images only the champion gets right (the candidate is significantly worse). A large p means no "
    "significant difference was seen, not that the two are equal."
)


def served_model_accuracy(train: dict[str, Any], export: dict[str, Any]) -> float:
    """Offline test accuracy of the model the image serves: the int8 model's (ONNX Runtime, test
    split) when export kept one, else the trained model's. The accuracy floor and the
    served-vs-offline skew gate then judge what is served, not the fp32 model it came from."""
    q = export.get("quantization") or {}
    if export.get("variant") == "int8" and q.get("kept") and q.get("int8_accuracy") is not None:
        return float(q["int8_accuracy"])
    return float(train["metrics"]["test_accuracy"])


# --------------------------------------------------------------------------- data identity


def data_identity(manifest: dict[str, Any], partition_window: Any = None) -> dict[str, Any]:
    """What chooses the data every gate and the champion re-score use: the source, the
    class list (label order) and the partition window.

    :param manifest: the snapshot's manifest (``source``, ``class_names``).
    :param partition_window: the window ``collect_data`` used (its XCom); ``None``: not
        partitioned. The source's ``partitions`` (which dates) roll every night and are
        not part of the identity; how many were asked for is.
    """
    source = {k: v for k, v in (manifest.get("source") or {}).items() if k != "partitions"}
    window = None if partition_window in (None, "", "none", "None") else int(partition_window)
    return {"source": source, "classes": [str(c) for c in manifest.get("class_names") or []],
            "partition_window": window}


def identity_tags(identity: dict[str, Any]) -> dict[str, str]:
    """The data identity as version tags (without the ``nightshift.`` prefix)."""
    from nightshift.contracts import VersionTag

    w = identity["partition_window"]
    return {VersionTag.DATA_SOURCE: json.dumps(identity["source"], sort_keys=True),
            VersionTag.DATA_CLASSES: _classes_tag(identity["classes"]),
            VersionTag.PARTITION_WINDOW: "none" if w is None else str(w)}


#: Longest class list kept verbatim in a tag (MLflow limits tag values); longer: its digest.
_MAX_TAG = 4000


def _classes_tag(classes: list[str]) -> str:
    text = json.dumps([str(c) for c in classes])
    if len(text) <= _MAX_TAG:
        return text
    import hashlib

    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()} ({len(classes)} classes)"


def _show_classes(classes: list[str], limit: int = 10) -> str:
    shown = ", ".join(map(str, classes[:limit]))
    return f"{len(classes)} [{shown}{', ...' if len(classes) > limit else ''}]"


def _show_source(source: dict[str, Any]) -> str:
    where = source.get("root") or source.get("name") or ""
    return f"{source.get('kind', '?')} {where}".strip()


def data_changes(identity: dict[str, Any], champion: dict[str, Any] | None) -> list[str]:
    """How this run's data differs from the champion's training data: one sentence each.

    No champion: nothing to compare (``[]``: the very first run is not held back). A
    champion registered without the data tags (an older Nightshift, or a hand-registered
    version) cannot be compared: that is one reason too (fail closed: a person decides).
    """
    from nightshift.contracts import TAG_PREFIX, VersionTag

    if champion is None:
        return []
    tags, v = champion.get("tags") or {}, champion["version"]
    src_tag, cls_tag, win_tag = (f"{TAG_PREFIX}{t}" for t in (VersionTag.DATA_SOURCE, VersionTag.DATA_CLASSES,
                                                               VersionTag.PARTITION_WINDOW))
    missing = [t for t in (src_tag, cls_tag, win_tag) if t not in tags]
    if missing:
        return [f"champion v{v} does not record its training data ({', '.join(missing)} missing): whether this "
                "run's source, classes and partition window are the same cannot be checked"]
    out = []
    try:
        source = json.loads(tags[src_tag])
    except ValueError:
        return [f"champion v{v}'s tag {src_tag} is not JSON: its training data cannot be compared"]
    if source != identity["source"]:
        out.append(f"source: this run reads {_show_source(identity['source'])}, champion v{v} was trained on "
                   f"{_show_source(source)}")
    if tags[cls_tag] != _classes_tag(identity["classes"]):
        try:
            theirs = [str(x) for x in json.loads(tags[cls_tag])]
        except ValueError:
            theirs = None
        if theirs is None:
            out.append(f"classes: this run has {_show_classes(identity['classes'])}, champion v{v} was trained on "
                       f"other classes ({tags[cls_tag][:120]})")
        else:
            mine = identity["classes"]
            gone, new = [x for x in theirs if x not in mine], [x for x in mine if x not in theirs]
            how = (f"missing here {_show_classes(gone)}, new here {_show_classes(new)}" if gone or new
                   else "same classes in another label order")
            out.append(f"classes: this run has {_show_classes(mine)}, champion v{v} was trained on "
                       f"{_show_classes(theirs)} ({how})")
    window = identity["partition_window"]
    theirs = None if tags[win_tag] in ("", "none") else tags[win_tag]
    if (None if window is None else str(window)) != theirs:
        def show(w):
            return "all data (not partitioned)" if w is None else f"the last {w} partition(s)"

        out.append(f"partition_window: this run uses {show(window)}, champion v{v} was trained on {show(theirs)}")
    return out


# --------------------------------------------------------------------------- evidence


def rescore(c, model_name: str, champion: dict[str, Any] | None, onnx_path: str, snapshot_uri: str,
            dst: str | Path, *, logger: Any = None, store: Any = None) -> dict[str, Any]:
    """Candidate and champion ONNX models on exactly today's test split, image by image
    (TFX Evaluator style).

    ``store``: the artifact store ``snapshot_uri`` is a URI of (None: a local path).

    :returns: ``n`` (test images), ``candidate`` (accuracy), and with a champion either
        ``champion`` and the paired counts ``champion_only``/``candidate_only``/``both``/
        ``neither``, or ``champion_error`` (why it cannot be scored: no ONNX artifact,
        another input shape or class list; its gate then fails). Registry outages raise.
    """
    from nightshift.data.snapshot import load_snapshot
    from nightshift.scoring import ScoringError, fetch_model_onnx, paired_counts, score_onnx

    lg = logger or log
    snap = load_snapshot(snapshot_uri, store=store)
    cand = score_onnx(onnx_path, snap.iter_split("test"), class_names=snap.class_names)
    out: dict[str, Any] = {"n": cand["n"], "candidate": cand["accuracy"]}
    if champion is None:
        return out
    try:
        path = fetch_model_onnx(c, model_name, champion["version"], dst)
        champ = score_onnx(path, snap.iter_split("test"), class_names=snap.class_names)
        out.update({"champion": champ["accuracy"], **paired_counts(champ["hits"], cand["hits"])})
    except ScoringError as exc:
        out["champion_error"] = str(exc)
        lg.warning("champion v%s cannot be re-scored on today's test split: %s", champion["version"], exc)
    lg.info("same test split (%d images): candidate %.4f, champion v%s %s", out["n"], out["candidate"],
            champion["version"], out.get("champion", out.get("champion_error")))
    return out


def evidence_summary(decision_gates: list[dict[str, Any]], thresholds: dict[str, Any]) -> dict[str, Any]:
    """The statistics of the accuracy gates, for ``promotion.json`` (``evidence``)."""
    by = {g["name"]: g for g in decision_gates}
    acc = {}
    for name in ("offline_accuracy", "served_accuracy"):
        g = by.get(name)
        if g is not None:
            acc[name] = {"value": g.get("observed"), "n": g.get("n"), "ci95": g.get("ci95")}
    vs = by.get("vs_champion") or {}
    obs = vs.get("observed") if isinstance(vs.get("observed"), dict) else None
    if obs:
        acc["candidate_same_split"] = {"value": obs.get("candidate"), "n": obs.get("n"),
                                       "ci95": obs.get("candidate_ci95")}
        acc["champion_same_split"] = {"value": obs.get("champion"), "n": obs.get("n"),
                                      "ci95": obs.get("champion_ci95")}
    paired = {k: obs.get(k) for k in ("champion_only_correct", "candidate_only_correct", "mcnemar_p")} if obs else None
    return {"test_images": (by.get("offline_accuracy") or {}).get("n"),
            "min_test_images": thresholds.get("min_test_images"), "champion_alpha": thresholds.get("champion_alpha"),
            "accuracies": acc, "paired": paired, "meaning": EVIDENCE_MEANING}


# --------------------------------------------------------------------------- the decision


def promote_candidate(c, *, model_name: str, snapshot: dict[str, Any], training: dict[str, Any],
                      export: dict[str, Any], image: dict[str, Any], system_eval: dict[str, Any],
                      drift: dict[str, Any] | None = None, validation: dict[str, Any] | None = None,
                      overrides: dict[str, Any] | None = None, gates_file: str | None = None,
                      require_approval: Any = False, run_id: str, dag_id: str, run_dir: str | Path,
                      artifact_root: Any, logger: Any = None) -> dict[str, Any]:
    """Decide on the candidate, register it, move ``champion`` when it may, record it all.

    :param c: an MLflow client (:func:`nightshift.registry.client`).
    :param snapshot: the ``collect_data`` result (``snapshot_uri``, ``partition_window``).
    :param training: the ``train_gpu`` result (``run_id``, ``metrics``, ``data_digest``).
    :param export: the ``export_onnx`` result (``onnx_path``, ``onnx_sha256``, ``parity``).
    :param image: the ``build_inference_image`` result (``image``, ``image_id``).
    :param system_eval: the ``system_eval`` result (served ``accuracy``, ``n``, latencies, errors).
    :param overrides: the run's threshold Params (``None``/``""`` do not override).
    :param gates_file: the gate file; ``None``/``""``: no file (the overrides are the policy).
    :param require_approval: a BLESSED candidate waits for a person in any case.
    :param run_id: the DAG run (history, tags); ``dag_id`` likewise.
    :param run_dir: the run's folder: ``promotion.json`` and the champion's downloaded model go there.
    :param artifact_root: the artifact store (or a local root folder): the champion lock and the
        promotion history go through it.
    :returns: the outcome (also in ``promotion.json``, path in ``report_path``).
    :raises ConfigError: an override is not a number.
    :raises RegistryError: the registry cannot be read (retryable; nothing is promoted).
    """
    from nightshift import registry
    from nightshift.artifacts import atomic_write_json
    from nightshift.contracts import PROMOTION_FILE, TAG_PREFIX, HistoryEvent, VersionTag, append_history, as_store
    from nightshift.data.snapshot import load_snapshot
    from nightshift.errors import ConfigError
    from nightshift.gates import Evidence, decide, load_thresholds, loosened_by_overrides, read_gate_file
    from nightshift.settings import to_bool

    lg = logger or log
    store = as_store(artifact_root)
    run_dir = Path(run_dir)
    gates_file = gates_file or None
    policy = read_gate_file(gates_file)
    thresholds, origin = load_thresholds(gates_file, overrides, policy=policy)
    try:
        loosened = loosened_by_overrides(gates_file, overrides, policy=policy)
    except ValueError as exc:
        raise ConfigError(f"promote: {exc}") from None
    if loosened:
        lg.warning("this run loosens the gate file (%s): a BLESSED candidate waits for approval", "; ".join(loosened))
    drift_view = {k: (drift or {}).get(k) for k in ("status", "drift_detected", "drifted_share", "report_html")}
    validation = validation or {}

    existing = registry.find_candidate(c, model_name, training["run_id"], export["onnx_sha256"])
    if existing is not None:  # a retry: never register twice, never re-decide against ourselves
        with champion_lock(store, model_name, purpose=f"promote (retry) {dag_id} {run_id}"):
            outcome = registry.resume_candidate(c, model_name, existing)
        lg.warning("v%s was already registered for this run by an earlier try: %s", outcome["version"],
                   outcome["note"])
        try:
            changed = json.loads(existing["tags"].get(f"{TAG_PREFIX}{VersionTag.DATA_CHANGED}") or "[]")
        except ValueError:
            changed = []
        outcome.update({"image": image.get("image"), "gates": outcome.pop("recorded_gates"),
                        "thresholds": thresholds, "drift": drift_view, "loosened_thresholds": loosened,
                        "data_changed": changed})
    else:
        champion = registry.get_champion(c, model_name)  # RegistryError (retryable) unless "not found"
        manifest = load_snapshot(snapshot["snapshot_uri"], store=store).manifest
        identity = data_identity(manifest, _window(snapshot, manifest))
        changed = data_changes(identity, champion)
        if changed:
            lg.warning("this run's data differs from champion v%s's (%s): a BLESSED candidate waits for approval",
                       champion["version"] if champion else None, "; ".join(changed))
        scores = rescore(c, model_name, champion, export["onnx_path"], snapshot["snapshot_uri"],
                         run_dir / "champion", logger=lg, store=store)
        served = system_eval
        evidence = Evidence(
            validation_passed=bool(validation.get("success")),
            offline_accuracy=served_model_accuracy(training, export),
            parity_passed=bool(export["parity"]["passed"]),
            served_accuracy=served.get("accuracy"),
            p95_latency_ms=(served.get("latency_ms") or {}).get("p95"),
            p99_latency_ms=(served.get("latency_ms") or {}).get("p99"),
            throughput_rps=served.get("throughput_rps"),
            serving_errors=served.get("errors"),
            champion_accuracy=scores.get("champion"),
            champion_version=champion["version"] if champion else None,
            candidate_accuracy_same_split=scores.get("candidate"),
            champion_error=scores.get("champion_error"),
            test_images=scores.get("n"),
            served_images=served.get("n"),
            champion_only_correct=scores.get("champion_only"),
            candidate_only_correct=scores.get("candidate_only"),
        )
        decision = decide(export["onnx_sha256"][:12], evidence, thresholds)
        tags = {"snapshot_uri": snapshot["snapshot_uri"], "data_digest": training.get("data_digest"),
                "collection_id": snapshot.get("collection_id"),
                "offline_accuracy": evidence.offline_accuracy, "served_accuracy": evidence.served_accuracy,
                "p95_latency_ms": evidence.p95_latency_ms, "image": image.get("image"),
                "image_id": image.get("image_id"), "onnx_sha256": export["onnx_sha256"],
                "dag_run": run_id, "drift_share": (drift or {}).get("drifted_share"),
                **identity_tags(identity), VersionTag.DATA_CHANGED: json.dumps(changed)}
        wait = to_bool(require_approval) or bool(loosened) or bool(changed)
        # one writer of champion: the alias moves (compare-and-set on the baseline) under the model's lock
        with champion_lock(store, model_name, purpose=f"promote {dag_id} {run_id}"):
            outcome = registry.register_candidate(c, model_name, training["run_id"], artifact_path="onnx",
                                                  tags=tags, decision=decision, require_approval=wait)
        gates = decision.to_dict()["gates"]
        outcome.update({"image": image.get("image"), "gates": gates,
                        "thresholds": thresholds, "offline_accuracy": evidence.offline_accuracy,
                        "served_accuracy": evidence.served_accuracy, "p95_latency_ms": evidence.p95_latency_ms,
                        "drift": drift_view, "threshold_origin": origin, "loosened_thresholds": loosened,
                        "data": identity, "data_changed": changed,
                        "same_split_scores": scores, "evidence": evidence_summary(gates, thresholds)})
        for g in decision.gates:
            lg.info("gate %-16s %s  %s", g.name, "PASS" if g.passed else "FAIL", g.detail)
    if outcome.get("awaiting_approval") and changed:
        champ = outcome.get("previous_champion")
        outcome["reason"] = (f"{outcome['reason']}. Waiting for a person because this run's data differs from "
                             f"champion v{champ}'s: " + "; ".join(changed))
    outcome["approval_reasons"] = [*loosened, *(f"data changed: {why}" for why in changed)] \
        if outcome.get("awaiting_approval") else []
    path = atomic_write_json(run_dir / PROMOTION_FILE, outcome)
    # Always recorded, once: a retry whose first try moved champion (or decided) but died before
    # this line writes it now; one that finds it there writes nothing (the key is the run's).
    report = store.publish(path)  # the history names it for every reader (the path itself on a local root)
    append_history(store, HistoryEvent(
        model=model_name,
        action="promoted" if outcome["promoted"] else
        ("awaiting_approval" if outcome.get("awaiting_approval") else "rejected"),
        version=outcome["version"], previous_champion=outcome["previous_champion"],
        champion=outcome["champion"], reason=outcome["reason"], dag_id=dag_id,
        run_id=run_id, extra={"report": report}))
    outcome["report_path"] = str(path)
    return outcome


def _window(snapshot: dict[str, Any], manifest: dict[str, Any]) -> Any:
    """The partition window ``collect_data`` used: its XCom's, else (an older XCom) how many
    partitions the snapshot's source lists."""
    if "partition_window" in snapshot:
        return snapshot["partition_window"]
    parts = (manifest.get("source") or {}).get("partitions")
    return len(parts) if parts else None
