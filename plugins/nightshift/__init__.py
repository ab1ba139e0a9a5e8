"""Nightshift: an Airflow-native pipeline that keeps an image classifier fresh.

The core modules (``data``, ``quality``, ``training``, ``export``, ``wheelhouse``,
``inference_image``, ``evaluation``, ``loadgen``, ``drift``, ``registry``) import no Airflow; ``operators`` wraps
them thinly. ``serving`` is copied into the inference image and imports neither
Airflow nor torch.
"""

__version__ = "0.1.0"
