"""ValidateDataOperator (nightshift.operators.validate) called directly: a readable list of what
failed, and a missing upstream result that names its task."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException

from nightshift.operators import (
    CollectDataOperator,
    ValidateDataOperator,
)

#: every test here runs on a local artifact root of its own
pytestmark = pytest.mark.usefixtures("nightshift_home")


def test_validate_fails_on_corrupt_file_with_readable_list(ctx, make_imagefolder):
    root = make_imagefolder(classes=("0", "1", "2"), per_class=30, corrupt=1)
    snap = CollectDataOperator(task_id="collect", source=str(root), image_shape=[8, 8, 1]).execute(ctx)
    assert snap["undecodable"] == 1
    op = ValidateDataOperator(task_id="validate", snapshot=snap, min_rows=10)
    with pytest.raises(AirflowFailException, match="corrupt_0.png"):
        op.execute(ctx)


def test_validate_passes_on_bundled(ctx):
    snap = CollectDataOperator(task_id="collect").execute(ctx)
    out = ValidateDataOperator(task_id="validate", snapshot=snap).execute(ctx)
    assert out["success"] is True and out["evaluated"] >= 8


def test_validate_without_upstream_result_says_which_task(ctx):
    with pytest.raises(AirflowFailException, match="collect_data"):
        ValidateDataOperator(task_id="validate", snapshot=None).execute(ctx)
