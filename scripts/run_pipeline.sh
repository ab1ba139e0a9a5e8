#!/usr/bin/env bash
# Run nightly_retrain once, locally, with `airflow dags test`, then print the outcome.
# Extra arguments are passed to the DAG as params, e.g.
#   scripts/run_pipeline.sh '{"epochs": 20, "source": "/data/my_imagefolder"}'
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
conf="${1:-{\}}"
log="$NIGHTSHIFT_HOME/last_run.log"
echo "== airflow dags test nightly_retrain (full log: $log)"
rm -f "$log"
airflow dags test nightly_retrain --conf "$conf" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null' INT TERM
python scripts/progress.py "$log" "$pid"
wait $pid
rc=$?
trap - INT TERM
python scripts/summary.py nightly_retrain || rc=1
[ $rc -eq 0 ] || echo "(see $log for the full task logs)"
exit $rc
