# Source this file (`. scripts/env.sh`) to use the project's local state from a shell:
# the virtualenv, a project-local AIRFLOW_HOME (SQLite) and MLflow (SQLite + local artifacts).
# Every value can be overridden by exporting it before sourcing.
_ns_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"
export NIGHTSHIFT_ROOT="$_ns_root"
export NIGHTSHIFT_HOME="${NIGHTSHIFT_HOME:-$_ns_root/.nightshift}"
export NIGHTSHIFT_ARTIFACT_ROOT="${NIGHTSHIFT_ARTIFACT_ROOT:-$NIGHTSHIFT_HOME/artifacts}"
export NIGHTSHIFT_BASE_IMAGE="${NIGHTSHIFT_BASE_IMAGE:-nightshift/base:bookworm}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$NIGHTSHIFT_HOME/mlflow.db}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$NIGHTSHIFT_HOME/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$_ns_root/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$_ns_root/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-sqlite:///$AIRFLOW_HOME/airflow.db}"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS:-True}"
export AIRFLOW__API__HOST="${AIRFLOW__API__HOST:-127.0.0.1}"
export GX_ANALYTICS_ENABLED=False
export MLFLOW_ENABLE_ASYNC_LOGGING=false
export PYTHONPATH="$_ns_root/plugins${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$_ns_root/.venv/bin:$PATH"
mkdir -p "$NIGHTSHIFT_HOME" "$AIRFLOW_HOME"
unset _ns_root
