# Airflow image for deploying Nightshift (scheduler, API server, workers).
# Astro users: `astro deploy` builds this file; plain Airflow: `docker build .`.
# GPU workers need a CUDA-capable node; torch==2.14.1 from PyPI is a CUDA build.
FROM apache/airflow:3.3.2-python3.11

USER root
COPY packages.txt /tmp/packages.txt
RUN apt-get update \
 && xargs -a /tmp/packages.txt apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/* /tmp/packages.txt
USER airflow

COPY requirements.txt constraints.txt /tmp/
RUN pip install --no-cache-dir "apache-airflow==3.3.2" -r /tmp/requirements.txt -c /tmp/constraints.txt

COPY --chown=airflow:root dags/ /opt/airflow/dags/
COPY --chown=airflow:root plugins/ /opt/airflow/plugins/
COPY --chown=airflow:root include/ /opt/airflow/include/
ENV PYTHONPATH=/opt/airflow/plugins \
    NIGHTSHIFT_HOME=/opt/airflow/nightshift \
    GX_ANALYTICS_ENABLED=False
