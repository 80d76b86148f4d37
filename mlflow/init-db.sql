-- A database of its own for MLflow beside Airflow's (docker-compose.yaml mounts this into postgres).
CREATE USER mlflow WITH PASSWORD 'mlflow';
CREATE DATABASE mlflow OWNER mlflow;
