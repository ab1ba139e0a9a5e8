"""
### model_config_errors — what is wrong in include/models.yaml, as an Airflow import error

This file defines no Dag. `nightly_retrain.py` and `drift_monitor.py` generate one Dag per
well-formed entry of the models file (`$NIGHTSHIFT_MODELS_FILE`, default `include/models.yaml`) and
skip the malformed ones; this file raises what is wrong with those (the entry and the field), so
the Airflow UI lists it under *Import errors* while every other model's Dags load. (Airflow keeps
no Dag of a file that raises, so the error cannot live in the generating files.)
"""

from __future__ import annotations

from airflow.sdk import get_parsing_context

from nightshift.errors import ConfigError
from nightshift.model_config import load_models

if not get_parsing_context().dag_id:  # a task process builds only its own Dag: nothing to report there
    _config = load_models()
    if _config.errors:
        raise ConfigError(_config.error_report())
