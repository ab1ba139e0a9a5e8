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
# Ctrl-C: stop the run (a waiting approval stays open in Airflow; the summary says where).
# `airflow dags test` catches SIGTERM and may go on waiting for a person: kill it after 15 s.
stop() {
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 30); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  echo "(airflow dags test did not stop within 15 s of SIGTERM: killing it)"
  kill -KILL "$pid" 2>/dev/null
}
trap stop INT TERM
python scripts/progress.py "$log" "$pid"
wait $pid
rc=$?
trap - INT TERM
python scripts/summary.py nightly_retrain || rc=1
[ $rc -eq 0 ] || echo "(see $log for the full task logs)"
exit $rc
