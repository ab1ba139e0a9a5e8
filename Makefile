# Nightshift — the two commands a newcomer needs:
#   make run    set everything up, run nightly_retrain once on the bundled data, print the outcome
#   make test   set everything up, run the whole test suite
SHELL := /bin/bash
ENV := . scripts/env.sh &&
PYTEST_ARGS ?=

.PHONY: stop-serving setup run test test-fast airflow-ui mlflow-ui bench lock clean cluster cluster-down cluster-status

setup:
	bash scripts/setup.sh

run: setup
	$(ENV) bash scripts/run_pipeline.sh

test: setup
	$(ENV) NIGHTSHIFT_REQUIRE_DOCKER=1 python -m pytest $(PYTEST_ARGS)

# Unit + DAG tests only (no whole-DAG runs).
test-fast: setup
	$(ENV) python -m pytest -m "not integration" $(PYTEST_ARGS)

# Airflow UI (API server + scheduler + dag processor + triggerer) on http://127.0.0.1:8080
airflow-ui: setup
	$(ENV) airflow standalone

# MLflow UI over the same tracking DB and registry, on http://127.0.0.1:5000
mlflow-ui: setup
	$(ENV) mlflow ui --backend-store-uri "$$MLFLOW_TRACKING_URI" --host 127.0.0.1 --port 5000

# Cluster profile, all on 127.0.0.1: PostgreSQL, Redis, SeaweedFS's S3 gateway, an MLflow
# tracking server, Airflow (api-server http://127.0.0.1:18403, scheduler, dag-processor,
# triggerer) with two Celery workers. Use it from a shell with `. scripts/cluster/env.sh`.
cluster: setup
	$(ENV) python scripts/cluster/cluster.py up

cluster-down:
	$(ENV) python scripts/cluster/cluster.py down

cluster-status:
	$(ENV) python scripts/cluster/cluster.py status

bench: setup
	$(ENV) python bench/serving_cpu.py
	$(ENV) python bench/serving_app.py
	$(ENV) python bench/serving.py --soak 60
	$(ENV) python bench/serving_deployed.py
	$(ENV) python bench/run_benchmarks.py

# Re-resolve the full pinned set after editing requirements.txt.
lock:
	$(ENV) pip freeze --exclude-editable | grep -v -E '^(pytest|iniconfig|pluggy)==' > constraints.txt

clean:
	rm -rf .nightshift/artifacts .nightshift/airflow .nightshift/mlflow.db .nightshift/mlartifacts

# Stop the champion nightly_retrain deployed (serving and proxy containers on 127.0.0.1:8600), on the
# daemon the deploy task uses: the Airflow connection NIGHTSHIFT_DOCKER_CONN_ID names, else DOCKER_HOST
stop-serving:
	$(ENV) python -c "import sys; from nightshift.deploy import LocalDeployer; from nightshift.operators.base import resolve_docker_client; from nightshift.placement import DockerPlacement; from nightshift.settings import Settings; LocalDeployer(resolve_docker_client(DockerPlacement.from_env().conn_id), model_name=sys.argv[1], artifact_root=Settings.from_env().artifact_root).undeploy()" $${MODEL:-nightshift-digits}
