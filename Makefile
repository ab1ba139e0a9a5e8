# Nightshift — the two commands a newcomer needs:
#   make run    set everything up, run nightly_retrain once on the bundled data, print the outcome
#   make test   set everything up, run the whole test suite
SHELL := /bin/bash
ENV := . scripts/env.sh &&
PYTEST_ARGS ?=

.PHONY: stop-serving setup run test test-fast airflow-ui mlflow-ui bench lock clean

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

# Stop the champion nightly_retrain deployed (serving and proxy containers on 127.0.0.1:8600)
stop-serving:
	$(ENV) python -c "import sys; from nightshift.deploy import LocalDeployer; from nightshift.inference_image import connect_docker; from nightshift.settings import Settings; LocalDeployer(connect_docker(), model_name=sys.argv[1], artifact_root=Settings.from_env().artifact_root).undeploy()" $${MODEL:-nightshift-digits}
