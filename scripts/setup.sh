#!/usr/bin/env bash
# One idempotent set-up for `make run` and `make test`:
# virtualenv + pinned packages, Airflow DB, MLflow store, Docker daemon, base image.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=".venv/.nightshift-$(cat requirements.txt requirements-dev.txt constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "== virtualenv: installing pinned requirements into .venv (first time: a few minutes)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  # (grep drops pip's notes about this machine's unused local index folders)
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | { grep -v "is ignored: it is neither" || true; }
  .venv/bin/python -m pip install -q -r requirements-dev.txt -c constraints.txt 2>&1 \
    | { grep -v "is ignored: it is neither" || true; }
  # (GX logs ~200 INFO lines on import once Airflow has set up logging: keep them out of the way)
  .venv/bin/python -c "import logging; logging.getLogger('great_expectations').setLevel(logging.WARNING)
import airflow, torch, onnxruntime, great_expectations, evidently, mlflow" || {
    echo "virtualenv: install incomplete (see pip output above)" >&2; exit 1; }
  rm -f .venv/.nightshift-*; touch "$stamp"
else
  echo "== virtualenv: .venv up to date"
fi

echo "== airflow: metadata DB at $AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"
airflow db migrate >"$NIGHTSHIFT_HOME/airflow-db-migrate.log" 2>&1 || {
  tail -n 30 "$NIGHTSHIFT_HOME/airflow-db-migrate.log" >&2; exit 1; }
python scripts/load_airflow_settings.py airflow_settings.yaml

echo "== mlflow: tracking + registry at $MLFLOW_TRACKING_URI"
python - <<'PY'
from nightshift import registry
from nightshift.settings import Settings
s = Settings.from_env()
c = registry.client(s.mlflow_tracking_uri, s.mlflow_registry_uri)
c.search_experiments(max_results=1)  # creates / migrates the SQLite store
PY

echo "== docker"
bash scripts/ensure_docker.sh
bash scripts/ensure_base_image.sh
bash scripts/ensure_registry.sh

echo "== chromium (browser test of the Nightshift view)"
bash scripts/ensure_chromium.sh

echo "== serving wheelhouse"
python - <<'PY'
from nightshift.wheelhouse import ensure_wheelhouse, serving_requirements
from nightshift.settings import Settings
print("wheelhouse:", ensure_wheelhouse(Settings.from_env().wheelhouse, serving_requirements()))
PY
echo "== setup done"
