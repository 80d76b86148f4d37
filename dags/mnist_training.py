"""
### mnist_training

Nightly (02:00 in Airflow's default_timezone, UTC unless set) or on demand: **prep → validate → search →
train → evaluate → compress → register → gate → review**. One run at a time: a run triggered while a
review card waits starts once the card is answered (or closes).

The search (Optuna: TPE sampling, successive-halving pruning by default) runs `search_workers` trial
workers at once, as a mapped task in the `hyperparameter_search` pool; they share one study until the
trial or time budget is spent, then `select` hands the best hyperparameters to train. Its first trial
is the champion's hyperparameters (the form's while there is no champion; `search_start_from`). Trigger
with `search: false` to skip it and train with the form's hyperparameters.

Compress prunes (to `compress_sparsity`, fine-tuned) and quantizes the model, converts every variant
(float32, float16, dynamic range, int8, pruned int8) to TFLite, measures accuracy, size and latency
with LiteRT, and keeps the smallest variant within `compress_max_accuracy_drop` points of the float
model on the validation split (the test split only reports) that is no slower than it (else float). That variant is what gets registered and served.

The gate scores the new version (the challenger) and the version with alias `champion` on the same
test set, as serving would run them: it passes with at least `gate_min_accuracy` and at most
`gate_max_regression` points below the champion (the first model: the floor only). The verdict and
its reasons become tags of the new version.

Review (`review`): `approval` (default) waits for a reviewer: the card in Required Actions shows the
version against the champion, the gate's reasons and the compression result; Approve moves the MLflow
alias `champion` to the version and records reviewer, time and comment as version tags, Reject tags it
rejected. `auto` promotes a version that passed the gate; `none` stops after the gate.

Each task runs one step of the `mlsteps` package: as a Kubernetes pod (runtime `kubernetes`, the
production default) or as a local process (runtime `local`), chosen by `MLOPS_RUNTIME`. Every run
logs to one MLflow run; the compressed model becomes a new version of the registered model with alias
`challenger` and lineage and compression tags (dataset digest, code version, DAG run, variant, size).

Trigger with config to change the dataset, the hyperparameters or where training is scheduled.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from functools import partial

# Named at top level so that the DAG processor pre-imports it once before forking parsers
# ([dag_processor] parsing_pre_import_modules): the provider's ~0.7 s import is then not paid per parse.
import airflow.providers.cncf.kubernetes.operators.pod  # noqa: F401
from airflow.sdk import DAG, Param
from mlops_airflow.review import (COMMENT, DECIDED_AT, DECISION, REJECTED, REJECTED_AT, REJECTED_BY,
                                  REJECTED_COMMENT, REVIEW_MODES, REVIEWER, approval, plan_rejection,
                                  plan_review)
from mlops_airflow.search import (HYPERPARAMETERS, START_FROM, START_FROM_ARGS, check_training_conf,
                                  hyperparameters, plan_search)
from mlops_airflow.settings import DATASETS, LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, MODEL_NAME_PATTERN, load
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
        "dataset": Param(settings.default_dataset, enum=list(DATASETS),
                         description="Dataset to train on; 'custom' reads the IDX files in source_dir. Scheduled "
                                     "runs take the default (MLOPS_DEFAULT_DATASET)."),
        # null too, wherever emptying a field must work: the form sends an emptied field as null.
        "source_dir": Param(settings.default_source_dir, type=["null", "string"],
                            description="Folder with the four IDX files (.gz or raw). Empty: search the cache, "
                                        "/usr/share/datasets/, then download from the mirrors."),
        "epochs": Param(5, type="integer", minimum=1, maximum=500, description="Training epochs."),
        "batch_size": Param(128, type="integer", minimum=8, maximum=8192,
                            description="Global batch size; used when search is off."),
        "learning_rate": Param(0.003, type="number", exclusiveMinimum=0, maximum=1,
                               description="Peak learning rate (Adam, cosine decay); used when search is off."),
        "width": Param(32, type="integer", minimum=4, maximum=512,
                       description="Model width: filters of the first conv layer (32 ≈ 88K parameters); "
                                   "used when search is off."),
        "dropout": Param(0.2, type="number", minimum=0, maximum=0.9,
                         description="Dropout before the classifier; used when search is off."),
        "search": Param(True, type="boolean",
                        description="Search hyperparameters before training. Off: train with learning_rate, "
                                    "batch_size, width and dropout as given."),
        "search_trials": Param(20, type="integer", minimum=1, maximum=1000,
                               description="Trial budget: complete + pruned trials over all workers."),
        "search_workers": Param(2, type="integer", minimum=1, maximum=64,
                                description="Trial workers running at once (one pod each; the pool caps them; "
                                            "never more than search_trials)."),
        "search_timeout_minutes": Param(120, type="number", exclusiveMinimum=0, maximum=600,
                                        description="Time budget of the search; a running trial finishes "
                                                    "(a worker task may run 12 h)."),
        "search_epochs": Param(5, type="integer", minimum=1, maximum=200,
                               description="Epochs of a trial that is never pruned."),
        "search_pruner": Param("successive_halving", enum=["successive_halving", "hyperband", "median", "none"],
                               description="Early stopping of unpromising trials. Hyperband splits the trials "
                                           "into brackets and TPE learns within one bracket at a time, each "
                                           "with its own 5 random start-up trials: for large budgets."),
        "search_reduction_factor": Param(3, type="integer", minimum=2, maximum=8,
                                         description="successive_halving and hyperband: a trial trains on past a "
                                                     "rung only if in the best 1/N there (2: judged more often, "
                                                     "half kept each time). Other pruners ignore it."),
        "search_sampler": Param("tpe", enum=["tpe", "random"], description="How trials are proposed."),
        "search_objective": Param("val_accuracy", enum=["val_accuracy", "val_loss"],
                                  description="Validation metric the search optimises (per epoch, for pruning)."),
        "search_space": Param({}, type=["null", "object"],
                              description='Overrides of the search space, e.g. {"learning_rate": {"low": 0.001, '
                                          '"high": 0.01, "log": true}, "width": [32, 48], "dropout": 0.2}.'),
        "search_start_from": Param("champion", enum=list(START_FROM),
                                   description="The search's first trial: the champion's hyperparameters (the "
                                               "form's learning_rate, batch_size, width and dropout while there "
                                               "is no champion), the form's, or none (the sampler's only). A "
                                               "value outside search_space is left to the sampler."),
        "search_train_examples": Param(0, type="integer", minimum=0,
                                       description="Train each trial on the first N examples (0: all)."),
        "search_gpus": Param(1, type="integer", minimum=0, maximum=1,
                             description="GPU per trial-worker pod (a trial trains on one device); 0: CPU."),
        "compress_sparsity": Param(0.82, type="number", minimum=0, maximum=0.95,
                                   description="Share of conv/dense weights (kernels of 1,024 or more) pruned "
                                               "to zero before int8 quantization (0: no pruned variant)."),
        "compress_method": Param("post_training", enum=["post_training", "quantization_aware"],
                                 description="int8 of the pruned model: post-training quantization, or "
                                             "pruning-preserving quantization-aware training."),
        "compress_max_accuracy_drop": Param(0.3, type="number", minimum=-100, maximum=100,
                                            description="Largest accepted validation-accuracy drop of a "
                                                        "compressed variant, in percentage points (else float is "
                                                        "kept)."),
        "compress_finetune_epochs": Param(5, type="integer", minimum=1, maximum=50,
                                          description="Fine-tuning epochs while pruning (and again of QAT), "
                                                      "each about one training epoch on two CPUs."),
        "gate_min_accuracy": Param(0.85, type="number", minimum=0, maximum=1,
                                   description="Quality gate floor: the new version's test accuracy (0..1)."),
        "gate_max_regression": Param(0.5, type="number", minimum=0, maximum=100,
                                     description="Quality gate: largest accepted test-accuracy drop against "
                                                 "the champion, in points."),
        "review": Param("approval", enum=list(REVIEW_MODES),
                        description="approval: wait for a reviewer in Required Actions; auto: promote a version "
                                    "that passes the gate; none: stop after the gate."),
        "gpus": Param(1, type="integer", minimum=0, maximum=16,
                      description="GPUs for the training pod (Kubernetes runtime); 0 trains on CPU."),
        "node_selector": Param({}, type=["null", "object"], propertyNames={"pattern": LABEL_KEY_PATTERN},
                               additionalProperties={"type": "string", "pattern": LABEL_VALUE_PATTERN},
                               description='Node selector for the training and trial-worker pods, e.g. '
                                           '{"cloud.google.com/gke-nodepool": "gpu-a100"} (they tolerate a GPU '
                                           "pool's nvidia.com/gpu taint, without GPUs too)."),
        "model_name": Param(settings.model_name, type="string", minLength=1, maxLength=200,
                            pattern=MODEL_NAME_PATTERN,
                            description="Registered model name in MLflow: letters, digits, _ . - "
                                        "(it is in the model server's URLs)."),
    },
) as dag:
    prep = step("prep", timeout=timedelta(minutes=30), resources=Resources(cpu="1", memory="2Gi"),
                # a run's config with a key that is not a param, or a batch train would refuse, fails here, named
                pre_execute=partial(check_training_conf, runtime=settings.runtime),
                args={"data_root": settings.data_root, "dataset": "{{ params.dataset }}",
                      "source_dir": "{{ params.source_dir or '' }}"})
    validate = step("validate", timeout=timedelta(minutes=15), resources=Resources(cpu="1", memory="3Gi"),
                    args={"manifest": xcom("prep", "manifest"), **common})
    search = {"manifest": xcom("prep", "manifest"), **common, "trials": "{{ params.search_trials }}",
              "timeout_minutes": "{{ params.search_timeout_minutes }}", "max_epochs": "{{ params.search_epochs }}",
              "pruner": "{{ params.search_pruner }}", "sampler": "{{ params.search_sampler }}",
              "reduction_factor": "{{ params.search_reduction_factor if params.search_pruner in "
                                  "('successive_halving', 'hyperband') else 0 }}",
              "objective": "{{ params.search_objective }}", "search_space": "{{ (params.search_space or {}) | tojson }}",
              "train_examples": "{{ params.search_train_examples }}"}
    workers = plan_search()
    create_study = step("tune", task_id="create_study", timeout=timedelta(minutes=10),
                        resources=Resources(cpu="500m", memory="1Gi"), optional_secrets=(settings.optuna_secret,),
                        args={**search, **START_FROM_ARGS, "setup_only": "true",
                              # train's GPUs (Kubernetes: the form's gpus; a local train uses the machine's):
                              # refused now if a batch size of the space cannot split over them, not after it.
                              "train_gpus": "{{ params.gpus }}" if settings.runtime == "kubernetes" else "0"})
    # On Kubernetes each worker's pod limit sets TensorFlow's threads (mlops_airflow.pods); local workers share
    # this machine's cores (--threads).
    cpus = 4 if settings.runtime == "kubernetes" else (os.cpu_count() or 1)
    threads = {} if settings.runtime == "kubernetes" else {
        "threads": f"{{{{ [1, {cpus} // ([params.search_workers, params.search_trials] | min)] | max }}}}"}
    tune = step("tune", timeout=timedelta(hours=12), resources=Resources(cpu=str(cpus), memory="8Gi"),
                gpus="{{ params.search_gpus }}", node_selector_json="{{ (params.node_selector or {}) | tojson }}",
                optional_secrets=(settings.optuna_secret,), pool=settings.search_pool, expand_over=workers,
                # Two more tries than other steps: if every trial kills its worker (out of memory), a lost trial
                # counts once its retry died too, so a single worker's 5th try is the one that finds 3 such
                # failures and stops, and select names the cause.
                retries=4,
                args={**search, **threads})
    select = step("select", timeout=timedelta(minutes=15), resources=Resources(cpu="1", memory="2Gi"),
                  optional_secrets=(settings.optuna_secret,), args=common,
                  # once every worker stopped, even if some or all failed for good (what finished counts; if
                  # nothing did, select names the most common cause and closes the MLflow runs); skipped with
                  # the search. It also runs when a task before the search failed (Airflow has no rule for
                  # "failed, not upstream_failed"): it pulls no earlier result, so it renders, then fails
                  # saying the search never started.
                  trigger_rule="none_skipped")
    chosen = hyperparameters()
    train = step("train", timeout=timedelta(hours=6), resources=Resources(cpu="4", memory="8Gi"),
                 gpus="{{ params.gpus }}", node_selector_json="{{ (params.node_selector or {}) | tojson }}",
                 args={"manifest": xcom("prep", "manifest"), **common, "epochs": "{{ params.epochs }}",
                       **{name: xcom("hyperparameters", name) for name in HYPERPARAMETERS},
                       "search_run_id": xcom("hyperparameters", "search_run_id"),
                       "search_trial": xcom("hyperparameters", "trial")})
    evaluate = step("evaluate", timeout=timedelta(minutes=30), resources=Resources(cpu="2", memory="4Gi"),
                    args={"manifest": xcom("prep", "manifest"), "model_path": xcom("train", "model_path"),
                          **common})
    # Two CPUs: latency is measured with two interpreter threads (compress's --threads). 4 h: up to 50
    # fine-tuning epochs over the whole training set, twice with QAT, at width 64 on those two CPUs.
    compress = step("compress", timeout=timedelta(hours=4), resources=Resources(cpu="2", memory="4Gi"),
                    args={"manifest": xcom("prep", "manifest"), "model_path": xcom("train", "model_path"),
                          **common, "sparsity": "{{ params.compress_sparsity }}",
                          "method": "{{ params.compress_method }}",
                          "max_accuracy_drop": "{{ params.compress_max_accuracy_drop }}",
                          "finetune_epochs": "{{ params.compress_finetune_epochs }}", "threads": "2"})
    register = step("register", timeout=timedelta(minutes=10), resources=Resources(cpu="500m", memory="1Gi"),
                    args={"model_uri": xcom("compress", "model_uri"), "float_model_uri": xcom("train", "model_uri"),
                          "tags": "{{ ti.xcom_pull(task_ids='compress')['tags'] | tojson }}", "run_key": RUN_KEY,
                          "dataset": xcom("prep", "dataset"), "dataset_digest": xcom("prep", "digest"),
                          "float_metrics": "{{ ti.xcom_pull(task_ids='evaluate')['metrics'] | tojson }}",
                          "model_name": "{{ params.model_name }}", "dag_id": "{{ dag.dag_id }}",
                          "dag_run_id": "{{ run_id }}"})

    gate = step("gate", timeout=timedelta(minutes=20), resources=Resources(cpu="1", memory="2Gi"),
                args={"manifest": xcom("prep", "manifest"), "model_name": "{{ params.model_name }}",
                      "version": xcom("register", "version"), "min_accuracy": "{{ params.gate_min_accuracy }}",
                      "max_regression": "{{ params.gate_max_regression }}"})

    review = {"model_name": "{{ params.model_name }}", "version": xcom("register", "version"),
              "reviewer": REVIEWER, "comment": COMMENT, "decided_at": DECIDED_AT}
    plan = plan_review()
    approve = approval(mlflow_ui=settings.mlflow_ui_url)
    promote = step("review", task_id="promote", timeout=timedelta(minutes=10),
                   resources=Resources(cpu="250m", memory="512Mi"), trigger_rule="none_failed_min_one_success",
                   args={**review, "decision": DECISION})
    # plan_rejection runs after every review outcome (none_failed: promote done or skipped), not after a failure
    # upstream; record_rejection only when there is a rejection to record (approve skipped promote).
    rejection = plan_rejection()
    record = step("review", task_id="record_rejection", timeout=timedelta(minutes=10),
                  resources=Resources(cpu="250m", memory="512Mi"), trigger_rule="none_failed",
                  args={**review, "decision": REJECTED, "reviewer": REJECTED_BY, "comment": REJECTED_COMMENT,
                        "decided_at": REJECTED_AT})

    prep >> validate >> workers >> create_study >> tune >> select >> chosen
    validate >> chosen >> train >> evaluate >> compress >> register >> gate >> plan >> [approve, promote]
    approve >> promote >> rejection >> record
