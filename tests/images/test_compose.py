"""docker-compose.yaml: valid Compose, and its services agree with each other and with the code they run.

No Docker engine here (and its base images cannot be pulled), so compose is not started; what is checked is
what breaks `docker compose up` silently: the Compose Specification's schema (vendored in check-jsonschema),
then the addresses, credentials, image tags and names one service must share with another or with the code.
The MLflow service itself runs with this file's environment in test_mlflow_image.py (slow).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yaml"
CHECK = Path(sys.executable).with_name("check-jsonschema")
AIRFLOW_SERVICES = ["airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                    "airflow-triggerer"]


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]  # safe_load resolves the <<: *airflow merges


def _check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHECK), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_compose_file_validates_against_the_compose_specification():
    result = _check(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_refuses_an_invalid_compose_file(tmp_path):
    broken = tmp_path / "docker-compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("condition: service_healthy", "condition: service_up", 1))
    result = _check(broken)
    assert result.returncode != 0
    assert "service_up" in result.stdout + result.stderr


def test_every_build_context_and_dockerfile_exists(services):
    builds = {name: s["build"] for name, s in services.items() if "build" in s}
    assert set(builds) >= {"mlflow", *AIRFLOW_SERVICES}
    for name, build in builds.items():
        assert (ROOT / build["context"] / build["dockerfile"]).is_file(), f"{name}: {build}"


def test_built_images_carry_the_tags_their_dockerfiles_document(services):
    # Each Dockerfile's header says how to build it (`docker build -f <file> -t <tag> .`); compose must agree.
    for name, service in services.items():
        if "build" not in service:
            continue
        header = (ROOT / service["build"]["dockerfile"]).read_text()
        tags = re.findall(r"docker build -f \S+ -t (\S+)", header)
        assert service["image"] in tags, f"{name}: image {service['image']}, Dockerfile documents {tags}"


def test_mlflow_image_tag_is_the_mlflow_version_it_installs(services):
    pin = re.search(r"^mlflow==(\S+)", (ROOT / "mlflow" / "requirements.txt").read_text(), re.M).group(1)
    assert services["mlflow"]["image"].endswith(f":{pin}")


def test_every_dependency_is_a_service_and_airflow_waits_for_its_database(services):
    for name, service in services.items():
        for needed in service.get("depends_on", {}):
            assert needed in services, f"{name} depends on {needed}, which is not a service"
    assert services["airflow-init"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in AIRFLOW_SERVICES[1:]:
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def test_airflow_services_share_one_environment(services):
    first = services[AIRFLOW_SERVICES[0]]["environment"]
    for name in AIRFLOW_SERVICES[1:]:
        assert services[name]["environment"] == first, name
    # One JWT secret and one API secret key for all components (else task logs and workers get 401/403).
    assert {"AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"} <= set(first)


def _credentials(uri: str) -> tuple[str, str, str, str]:
    parts = urlsplit(uri)
    return parts.username, parts.password, parts.hostname, parts.path.lstrip("/")


def test_databases_are_the_ones_postgres_creates(services):
    postgres = services["postgres"]
    env = postgres["environment"]
    airflow_db = services["airflow-init"]["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert _credentials(airflow_db) == (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], "postgres",
                                        env["POSTGRES_DB"])
    # MLflow's database and user come from mlflow/init-db.sql, which postgres runs on first start.
    mounted = {v.split(":")[0] for v in postgres["volumes"]}
    assert "./mlflow/init-db.sql" in mounted
    sql = (ROOT / "mlflow" / "init-db.sql").read_text()
    user, password, host, database = _credentials(services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"])
    assert host == "postgres"
    assert f"CREATE USER {user} WITH PASSWORD '{password}';" in sql
    assert f"CREATE DATABASE {database} OWNER {user};" in sql


def test_airflow_reaches_mlflow_and_its_api_server_at_addresses_they_serve(services):
    env = services["airflow-init"]["environment"]
    mlflow = urlsplit(env["MLFLOW_TRACKING_URI"])
    assert mlflow.hostname == "mlflow"
    published = {p.split(":")[-1] for p in services["mlflow"]["ports"]}
    assert str(mlflow.port) in published
    # MLflow answers 403 to a Host header it does not allow.
    allowed = services["mlflow"]["environment"]["MLFLOW_ALLOWED_HOSTS"].split(",")
    assert mlflow.netloc in allowed
    execution = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert execution.hostname == "airflow-apiserver"
    assert str(execution.port) in {p.split(":")[-1] for p in services["airflow-apiserver"]["ports"]}
    assert execution.path == "/execution/"


def test_airflow_mounts_the_dags_and_plugins_of_this_repository(services):
    volumes = services["airflow-scheduler"]["volumes"]
    for folder in ("dags", "plugins"):
        assert f"./{folder}:/opt/airflow/{folder}:ro" in volumes
        assert (ROOT / folder).is_dir()


def test_init_creates_the_pool_the_search_workers_run_in(services, monkeypatch):
    sys.path.insert(0, str(ROOT / "plugins"))
    try:
        from mlops_airflow import settings
    finally:
        sys.path.remove(str(ROOT / "plugins"))
    env = services["airflow-init"]["environment"]
    for key in [k for k in os.environ if k.startswith("MLOPS_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():  # as compose interpolates them with nothing set on the host: the defaults
        monkeypatch.setenv(key, re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)))
    configured = settings.load()
    assert configured.default_dataset == "mnist" and configured.default_source_dir == ""
    command = " ".join(services["airflow-init"]["command"])
    assert f"airflow pools set {configured.search_pool} " in command
    assert configured.runtime == "kubernetes"
    assert configured.steps_image == env["MLOPS_STEPS_IMAGE"]
    assert re.fullmatch(r"ghcr\.io/mlops-mnist/steps:\S+", configured.steps_image)
    steps_tags = re.findall(r"docker build -f \S+ -t (\S+)", (ROOT / "images/steps/Dockerfile").read_text())
    assert configured.steps_image in steps_tags
