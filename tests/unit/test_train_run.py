"""The training run's bookkeeping (nightshift.train_run): the figures it writes beside the run and the
lineage tags it sets."""

from __future__ import annotations

import pytest

from nightshift.train_run import lineage_tags


def test_lineage_tags_from_the_manifest():
    manifest = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3",
                "versions": {"torch": "2.14.1", "cuda": "12.8"}, "lineage": {"git_sha": "abc123"}}
    assert lineage_tags(manifest) == {
        "nightshift.device_name": "NVIDIA H100 80GB HBM3", "nightshift.torch_version": "2.14.1",
        "nightshift.cuda_version": "12.8", "nightshift.git_sha": "abc123", "mlflow.source.git.commit": "abc123"}
    assert lineage_tags({"git": {"sha": "def"}})["nightshift.git_sha"] == "def"
    assert lineage_tags({"device": "cpu", "versions": {"torch": "2.14.1", "cuda": None}}) == {
        "nightshift.torch_version": "2.14.1"}


@pytest.mark.parametrize("uri, local", [
    ("http://mlflow:5000", False), ("https://mlflow.example", False),
    ("sqlite:////x/mlflow.db", True), ("/x/mlruns", True), ("postgresql://u@db/mlflow", True),
])
def test_mlflow_artifacts_go_to_the_server_when_there_is_one(uri, local, tmp_path):
    from nightshift.train_run import default_artifact_location

    got = default_artifact_location(uri, tmp_path)
    assert got == ((tmp_path / "mlartifacts").as_uri() if local else None)


def test_the_dataset_input_of_a_snapshot_names_its_digest_source_schema_and_counts(digits_snapshot):
    import json

    from nightshift.train_run import snapshot_dataset_fields

    fields = snapshot_dataset_fields(digits_snapshot, uri="s3://b/snapshots/x")
    assert fields["digest"] == digits_snapshot.digest and fields["source_type"] == "nightshift_snapshot"
    assert fields["name"].endswith("@" + digits_snapshot.digest[:12])
    assert json.loads(fields["source"])["uri"] == "s3://b/snapshots/x"
    schema = json.loads(fields["schema"])
    assert schema == {"image_shape": [8, 8, 1], "dtype": "uint8", "class_names": digits_snapshot.class_names}
    assert json.loads(fields["profile"])["counts"]["total"] == 1797
    assert json.loads(snapshot_dataset_fields(digits_snapshot)["source"])["uri"] == str(digits_snapshot.path)
