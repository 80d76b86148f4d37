"""
### mnist_training

Nightly (02:00 UTC) or on demand: **prep → validate → train → evaluate → register**.

Each task runs one step of the `mlsteps` package: as a Kubernetes pod (runtime `kubernetes`, the
production default) or as a local process (runtime `local`), chosen by `MLOPS_RUNTIME`. Every run
logs to one MLflow run; the trained model becomes a new version of the registered model with alias
`challenger` and lineage tags (dataset digest, code version, DAG run).

Trigger with config to change the dataset, the hyperparameters or where training is scheduled.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import partial

# Named at top level so that the DAG processor pre-imports it once before forking parsers
# ([dag_processor] parsing_pre_import_modules): the provider's ~0.7 s import is then not paid per parse.
import airflow.providers.cncf.kubernetes.operators.pod  # noqa: F401
from airflow.sdk import DAG, Param
from mlops_airflow.settings import load
from mlops_airflow.steps import RUN_KEY, Resources, xcom
from mlops_airflow.steps import step as render_step

settings = load()
step = partial(render_step, settings=settings)  # every step of this parse renders with the same settings
common = {"data_root": settings.data_root, "run_key": RUN_KEY}

with DAG(
    dag_id="mnist_training",
    description="Prepare, validate, train, evaluate and register an MNIST-style image classifier",
    doc_md=__doc__,
    schedule="0 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "training", "mnist"],
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=15),
    },
    params={
        "dataset": Param("mnist", enum=["mnist", "fashion_mnist", "custom"],
                         description="Dataset to train on; 'custom' reads the IDX files in source_dir."),
        "source_dir": Param("", type="string",
                            description="Folder with the four IDX files (.gz or raw). Empty: search the cache, "
                                        "/usr/share/datasets/, then download from the mirrors."),
        "epochs": Param(5, type="integer", minimum=1, maximum=500, description="Training epochs."),
        "batch_size": Param(128, type="integer", minimum=8, maximum=8192, description="Global batch size."),
        "learning_rate": Param(0.003, type="number", exclusiveMinimum=0, maximum=1,
                               description="Peak learning rate (Adam, cosine decay)."),
        "width": Param(32, type="integer", minimum=4, maximum=512,
                       description="Model width: filters of the first conv layer (32 ≈ 88K parameters)."),
        "gpus": Param(1, type="integer", minimum=0, maximum=16,
                      description="GPUs for the training pod (Kubernetes runtime); 0 trains on CPU."),
        "node_selector": Param({}, type="object",
                               description='Node selector for the training pod, e.g. '
                                           '{"cloud.google.com/gke-nodepool": "gpu-a100"}.'),
        "model_name": Param("mnist_classifier", type="string", minLength=1,
                            description="Registered model name in MLflow."),
    },
) as dag:
    prep = step("prep", timeout=timedelta(minutes=30), resources=Resources(cpu="1", memory="2Gi"),
                args={"data_root": settings.data_root, "dataset": "{{ params.dataset }}",
                      "source_dir": "{{ params.source_dir }}"})
    validate = step("validate", timeout=timedelta(minutes=15), resources=Resources(cpu="1", memory="3Gi"),
                    args={"manifest": xcom("prep", "manifest"), **common})
    train = step("train", timeout=timedelta(hours=6), resources=Resources(cpu="4", memory="8Gi"),
                 gpus="{{ params.gpus }}", node_selector_json="{{ params.node_selector | tojson }}",
                 args={"manifest": xcom("prep", "manifest"), **common, "epochs": "{{ params.epochs }}",
                       "batch_size": "{{ params.batch_size }}", "learning_rate": "{{ params.learning_rate }}",
                       "width": "{{ params.width }}"})
    evaluate = step("evaluate", timeout=timedelta(minutes=30), resources=Resources(cpu="2", memory="4Gi"),
                    args={"manifest": xcom("prep", "manifest"), "model_path": xcom("train", "model_path"),
                          **common})
    register = step("register", timeout=timedelta(minutes=10), resources=Resources(cpu="500m", memory="1Gi"),
                    args={"model_uri": xcom("train", "model_uri"), "run_key": RUN_KEY,
                          "dataset": xcom("prep", "dataset"), "dataset_digest": xcom("prep", "digest"),
                          "metrics": "{{ ti.xcom_pull(task_ids='evaluate')['metrics'] | tojson }}",
                          "model_name": "{{ params.model_name }}", "dag_id": "{{ dag.dag_id }}",
                          "dag_run_id": "{{ run_id }}"})

    prep >> validate >> train >> evaluate >> register
