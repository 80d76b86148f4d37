"""Airflow-side code of the pipeline: step factory, runtimes, settings."""
