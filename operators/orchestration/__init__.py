"""Airflow side of the platform: the StepOperator and the pod specs it submits.

This is the only package (with `dags/`) that imports Airflow; steps never do.
"""
