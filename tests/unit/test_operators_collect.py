"""CollectDataOperator (nightshift.operators.collect) called directly: the small JSON it pushes, the
Asset digest, and a source error a retry cannot fix."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException

from nightshift.operators import (
    SNAPSHOT_ASSET,
    CollectDataOperator,
)

#: every test here runs on a local artifact root of its own
pytestmark = pytest.mark.usefixtures("nightshift_home")


def test_collect_bundled_pushes_small_json_and_asset_digest(ctx, tmp_path):
    op = CollectDataOperator(task_id="collect")
    out = op.execute(ctx)
    assert out["counts"]["total"] == 1797 and out["image_shape"] == [8, 8, 1]
    assert out["snapshot_uri"].startswith(str(tmp_path / "artifacts" / "snapshots"))
    assert ctx["outlet_events"][SNAPSHOT_ASSET].extra["digest"] == out["digest"]
    assert op.outlets == [SNAPSHOT_ASSET]


def test_collect_unknown_class_fails_without_retry(ctx, make_imagefolder):
    root = make_imagefolder(classes=("0", "1"), per_class=3)
    op = CollectDataOperator(task_id="collect", source=str(root), classes=["0"])
    with pytest.raises(AirflowFailException, match=r"DataError.*\['1'\]"):
        op.execute(ctx)
