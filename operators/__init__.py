"""Infinity-Instruct data platform: steps over Arrow, their runner and CLI, and the Airflow operator.

Step transforms import neither Airflow nor storage; `operators.core.runner` is where steps meet
storage; `operators.airflow` is the only module that imports Airflow.
"""

__version__ = "0.1.0"
