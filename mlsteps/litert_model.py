"""An MLflow pyfunc model that runs a ``.tflite`` classifier with the LiteRT interpreter.

This file is logged as the model's code (MLflow "models from code"): it is copied into the model
artifact, so ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` need only MLflow, numpy and
ai-edge-litert, not the mlsteps package. The ``.tflite`` file comes in as the artifact ``tflite``.

Input: images as float32 pixels 0..255, shape (N, H, W) (the logged signature says so, and MLflow
enforces it before ``predict``). Output: class probabilities, shape (N, classes).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import mlflow
import numpy as np

THREADS_ENV = "LITERT_NUM_THREADS"


class LiteRTClassifier(mlflow.pyfunc.PythonModel):
    """Batched inference with one LiteRT interpreter (calls are serialised: an interpreter is not thread-safe)."""

    def load_context(self, context: Any) -> None:
        from ai_edge_litert.interpreter import Interpreter

        text = os.environ.get(THREADS_ENV, "1")
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{THREADS_ENV} must be a whole number >= 1 (interpreter threads), got {text!r}")
        threads = int(text)
        self._interpreter = Interpreter(model_path=context.artifacts["tflite"], num_threads=threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self._image_shape = tuple(int(d) for d in self._input["shape"][1:])
        self._batch = int(self._input["shape"][0])
        self._lock = threading.Lock()

    def _images(self, model_input: Any) -> np.ndarray:
        images = np.asarray(model_input, dtype=np.float32)
        if images.shape[1:] != self._image_shape:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, self._image_shape))}), "
                             f"got {images.shape}")
        return images

    # model_input as np.ndarray, a hint MLflow infers no schema from (the logged signature says it) and that
    # stops its warning, at every load, that predict has no type hints.
    def predict(self, context, model_input: np.ndarray, params=None):  # noqa: ANN001, ANN201
        """Class probabilities (N, classes) for N images, in one interpreter call."""
        images = self._images(model_input)
        if not len(images):
            return np.zeros((0, int(self._output["shape"][-1])), dtype=np.float32)
        with self._lock:
            if self._batch != len(images):
                self._interpreter.resize_tensor_input(self._input["index"], [len(images), *self._image_shape])
                self._interpreter.allocate_tensors()
                self._batch = len(images)
            self._interpreter.set_tensor(self._input["index"], images)
            self._interpreter.invoke()
            probabilities = self._interpreter.get_tensor(self._output["index"]).astype(np.float32)
        # An int8 model's softmax comes out in steps of 1/256: rows summed to 0.99, not 1. Rescaled, they do.
        sums = probabilities.sum(axis=1, keepdims=True)
        return np.divide(probabilities, sums, out=probabilities, where=sums > 0)


mlflow.models.set_model(LiteRTClassifier())
