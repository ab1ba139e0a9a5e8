"""Nightshift: an Airflow-native pipeline that keeps an image classifier fresh.

The core modules (``data``, ``quality``, ``training``, ``export``, ``scoring``, ``containers``,
``inference_image``, ``system_eval``, ``promotion``, ``drift``, ``registry``, ``store``, ``state``, ...)
import no Airflow (``tests/test_repository.py`` checks it); ``operators`` wraps them thinly,
``dags`` holds DAG factories and ``ui`` the Nightshift view. ``serving`` is copied into the
inference image and imports neither Airflow nor torch. docs/architecture.md has the map.
"""

__version__ = "0.1.0"
