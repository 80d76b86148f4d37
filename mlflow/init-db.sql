-- A database of its own for MLflow beside Airflow's (docker-compose.yaml mounts this into postgres).
CREATE USER mlflow WITH PASSWORD 'mlflow';
CREATE DATABASE mlflow OWNER mlflow;
-- ... and one for the hyperparameter search's Optuna studies (OPTUNA_STORAGE of the step pods).
CREATE USER optuna WITH PASSWORD 'optuna';
CREATE DATABASE optuna OWNER optuna;
