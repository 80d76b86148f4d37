# One machine, two environments (as in production, two images):
#   .venvs/airflow  Airflow 3.3 + cncf.kubernetes provider (requirements.txt, constraints.txt)
#   .venvs/steps    TensorFlow, MLflow and the mlsteps package (images/steps/requirements.txt)
PYTHON ?= python3
AIRFLOW_VENV := .venvs/airflow
STEPS_VENV := .venvs/steps
AIRFLOW_PY := $(AIRFLOW_VENV)/bin/python
STEPS_PY := $(STEPS_VENV)/bin/python

# make demo options
DATASET ?= mnist
EPOCHS ?= 5
BATCH_SIZE ?= 128
SOURCE_DIR ?=
SEARCH ?= true
SEARCH_TRIALS ?= 6
SEARCH_WORKERS ?= 1
SEARCH_EPOCHS ?= 2
SEARCH_EXAMPLES ?= 10000
COMPRESS_EPOCHS ?= 2
REVIEW ?= auto
# make test options: PYTEST_ARGS="-k resume", TEST_MARKERS="not slow" (TEST_SERIAL=1: suites one after the other)
PYTEST_ARGS ?=
TEST_MARKERS ?= not slow

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: envs demo test bench mlflow-start mlflow-stop serving-start serving-stop airflow-ui lock clean

envs: $(AIRFLOW_VENV)/.installed $(STEPS_VENV)/.installed

# From scratch (a package dropped from the requirements does not linger, nor end up in the next lock); the
# environment it replaces is kept until the new one is whole and put back if the install fails (offline).
$(AIRFLOW_VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	PYTHON="$(PYTHON)" scripts/make_venv.sh $(AIRFLOW_VENV) \
	  -- -r requirements.txt -r requirements-dev.txt -c constraints.txt

$(STEPS_VENV)/.installed: images/steps/requirements.txt images/steps/requirements-dev.txt images/steps/constraints.txt pyproject.toml
	PYTHON="$(PYTHON)" scripts/make_venv.sh $(STEPS_VENV) \
	  -- -r images/steps/requirements.txt -r images/steps/requirements-dev.txt -c images/steps/constraints.txt \
	  -- --no-deps -e .  # built with the backend pyproject.toml pins, as in the images

demo: envs
	DATASET="$(DATASET)" EPOCHS="$(EPOCHS)" BATCH_SIZE="$(BATCH_SIZE)" SOURCE_DIR="$(SOURCE_DIR)" SEARCH="$(SEARCH)" \
	  SEARCH_TRIALS="$(SEARCH_TRIALS)" SEARCH_WORKERS="$(SEARCH_WORKERS)" SEARCH_EPOCHS="$(SEARCH_EPOCHS)" \
	  SEARCH_EXAMPLES="$(SEARCH_EXAMPLES)" COMPRESS_EPOCHS="$(COMPRESS_EPOCHS)" REVIEW="$(REVIEW)" scripts/demo.sh

test: envs
	scripts/test.sh -m "$(TEST_MARKERS)" $(PYTEST_ARGS)

bench: envs
	scripts/bench.sh

mlflow-start: envs
	mlflow/server.sh start

mlflow-stop:
	mlflow/server.sh stop

serving-start: envs
	scripts/serving.sh start

serving-stop:
	scripts/serving.sh stop

airflow-ui: envs
	scripts/airflow-standalone.sh

# Regenerate the locks after changing a top-level pin: each environment resolved afresh from its
# requirements alone (the old lock would refuse the new pin), frozen, thrown away; then make envs. The steps
# image's GPU lock is what tensorflow[and-cuda] adds to its lock (resolved, not installed).
LOCK_VENV := .venvs/lock
lock:
	$(PYTHON) -m venv --clear $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(LOCK_VENV)/bin/python -m pip freeze --exclude-editable > $(LOCK_VENV)/freeze.txt
	sed '1i # Lock of the Airflow environment (pip freeze); regenerate with make lock.' $(LOCK_VENV)/freeze.txt > constraints.txt
	$(PYTHON) -m venv --clear $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q -r images/steps/requirements.txt -r images/steps/requirements-dev.txt
	$(LOCK_VENV)/bin/python -m pip freeze --exclude-editable > $(LOCK_VENV)/freeze.txt
	sed '1i # Lock of the steps environment (pip freeze); regenerate with make lock.' $(LOCK_VENV)/freeze.txt > images/steps/constraints.txt
	$(LOCK_VENV)/bin/python -m pip install -q --dry-run --ignore-installed --report $(LOCK_VENV)/gpu.json \
	    "tensorflow[and-cuda]" -c images/steps/constraints.txt
	$(PYTHON) scripts/lock_gpu.py $(LOCK_VENV)/gpu.json images/steps/constraints.txt > $(LOCK_VENV)/gpu.txt
	mv $(LOCK_VENV)/gpu.txt images/steps/constraints-gpu.txt
	rm -rf $(LOCK_VENV)

# Stops the servers and removes ./var (run data, MLflow store, Airflow home). A var elsewhere (MLOPS_VAR) is
# not removed: delete it yourself. Stop `make airflow-ui` first.
clean:
	MLOPS_VAR="$(CURDIR)/var" scripts/serving.sh stop
	MLOPS_VAR="$(CURDIR)/var" mlflow/server.sh stop
	rm -rf var
