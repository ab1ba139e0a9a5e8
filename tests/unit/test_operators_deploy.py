"""DeployModelOperator (nightshift.operators.deploy): what it skips and what it refuses before it
talks to Docker or Kubernetes. Real blue/green deploys: test_deploy.py; the operator's daemon:
test_operators_base.py."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from nightshift.errors import ConfigError
from nightshift.operators import DeployModelOperator

#: every test here runs on a local artifact root of its own
pytestmark = pytest.mark.usefixtures("nightshift_home")


def _deploy(**kw) -> DeployModelOperator:
    return DeployModelOperator(task_id="deploy", model_name="m", **kw)


def test_target_none_registers_without_deploying(ctx):
    with pytest.raises(AirflowSkipException, match="deploy_target is 'none'"):
        _deploy(promotion={"promoted": True, "version": "3"}, target="none").execute(ctx)


def test_a_run_that_did_not_promote_is_skipped_naming_the_version(ctx):
    with pytest.raises(AirflowSkipException, match=r"not deployed: m v3 was not promoted"):
        _deploy(promotion={"promoted": False, "version": "3"}).execute(ctx)


def test_an_unknown_target_fails_the_task_without_retries(ctx):
    with pytest.raises(AirflowFailException, match="ConfigError: deploy target must be 'docker' or 'kubernetes', got 'nomad'"):
        _deploy(promotion={"promoted": True, "version": "3", "champion": "3"}, target="nomad").execute(ctx)


def test_a_bad_request_log_sample_names_the_setting():
    from nightshift.operators.deploy import local_deployer

    with pytest.raises(ConfigError, match="request_log_sample"):
        local_deployer(_deploy(promotion={}), model_name="m", port=8600, request_log_sample="often")
