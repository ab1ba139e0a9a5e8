# Source this file (`. scripts/cluster/env.sh`) to talk to the cluster profile `make cluster`
# started: the project's venv and paths (scripts/env.sh), then the cluster's client settings
# written by scripts/cluster/cluster.py (.nightshift/cluster/cluster.env): Airflow on Postgres
# with the CeleryExecutor (AIRFLOW__...), MLFLOW_TRACKING_URI=http://127.0.0.1:<port>, the S3
# gateway's endpoint and dev credentials (AWS_ENDPOINT_URL_S3, MLFLOW_S3_ENDPOINT_URL,
# AWS_ACCESS_KEY_ID, ..., and the Airflow connection `nightshift_s3`).
_nsc_root="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/../.." && pwd)"
_nsc_env="${NIGHTSHIFT_CLUSTER_HOME:-$_nsc_root/.nightshift/cluster}/cluster.env"
if [ -f "$_nsc_env" ]; then
  . "$_nsc_root/scripts/env.sh"
  . "$_nsc_env"
  unset _nsc_root _nsc_env
else
  echo "cluster: $_nsc_env not found: start the cluster profile with 'make cluster' first" >&2
  unset _nsc_root _nsc_env
  return 1 2>/dev/null || exit 1
fi
