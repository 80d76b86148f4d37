"""The pipeline's step programs: pure Python, no Airflow import; each runs as a pod or a local process."""

import os

# TensorFlow's C++ info and warning lines drown the step logs; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
