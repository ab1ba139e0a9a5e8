"""The Nightshift view and report server: a FastAPI app the Airflow plugin mounts.

``data`` assembles what the page shows (Airflow-free, no heavy imports);
``app`` builds the FastAPI app (imported only by the API server, lazily).
"""
