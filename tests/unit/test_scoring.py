"""Re-scoring an ONNX model on today's test split (the champion comparison)."""

from __future__ import annotations

import onnx
import pytest

from nightshift.scoring import ScoringError, score_onnx


@pytest.fixture(scope="module")
def onnx_model(trained, tmp_path_factory):
    from nightshift.export import export_onnx
    from nightshift.training import load_checkpoint

    return export_onnx(load_checkpoint(trained.checkpoint_path), tmp_path_factory.mktemp("score") / "model.onnx")


def test_scores_with_matching_classes(onnx_model, digits_snapshot):
    res = score_onnx(onnx_model, digits_snapshot.iter_split("test"), class_names=digits_snapshot.class_names)
    assert res["n"] == digits_snapshot.count("test") and res["accuracy"] > 0.5


def test_other_classes_are_an_error_not_a_low_score(onnx_model, digits_snapshot):
    """A champion trained on other (or reordered) classes cannot be compared: its gate must
    fail closed instead of passing against a near-chance score."""
    reordered = list(reversed(digits_snapshot.class_names))
    with pytest.raises(ScoringError, match="trained on classes"):
        score_onnx(onnx_model, digits_snapshot.iter_split("test"), class_names=reordered)


def test_a_model_that_does_not_name_its_classes_cannot_be_compared(onnx_model, digits_snapshot, tmp_path):
    proto = onnx.load(str(onnx_model))
    kept = [p for p in proto.metadata_props if p.key != "class_names"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ScoringError, match="does not record its class names"):
        score_onnx(bare, digits_snapshot.iter_split("test"), class_names=digits_snapshot.class_names)
    assert score_onnx(bare, digits_snapshot.iter_split("test"))["n"] > 0  # without class_names: no check


def test_scoring_error_is_a_domain_error_importable_from_both_modules(tmp_path):
    """The error type lives with the others in :mod:`nightshift.errors`; callers that import it
    from :mod:`nightshift.scoring` get the same class (a data error: a retry cannot fix it)."""
    from nightshift import errors, scoring

    assert scoring.ScoringError is errors.ScoringError
    assert issubclass(errors.ScoringError, errors.DataError) and not errors.ScoringError.retryable
    missing = tmp_path / "absent.onnx"
    with pytest.raises(errors.ScoringError, match=f"ONNX model {missing} does not exist"):
        score_onnx(missing, [])
