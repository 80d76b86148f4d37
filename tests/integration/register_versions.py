"""Register test versions of a model (run with the steps environment's Python); prints their numbers as JSON.

    python register_versions.py <model name> good good broken

"good": the pipeline's CNN (fresh weights, int8 .tflite) as compress registers it; "broken": a .tflite that
is not a model (it downloads fine and fails to load).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import tf_keras

from mlsteps import compress, model

LITERT_MODEL = Path(compress.__file__).with_name("litert_model.py")


def main() -> None:
    name, kinds = sys.argv[1], sys.argv[2:]
    with tempfile.TemporaryDirectory() as tmp:  # log_model copies the files into MLflow's artifact store
        print(json.dumps(register(name, kinds, Path(tmp))))


def register(name: str, kinds: list[str], folder: Path) -> list[int]:
    good, broken = folder / "good" / "model.tflite", folder / "broken" / "model.tflite"
    good.parent.mkdir()
    broken.parent.mkdir()
    net = model.build(image_shape=(28, 28), num_classes=10, width=8, keras_module=tf_keras)
    representative = np.random.default_rng(0).uniform(0, 255, (50, 28, 28)).astype(np.float32)
    good.write_bytes(compress.convert(net, "int8", representative))
    broken.write_bytes(b"not a flatbuffer" * 64)
    versions = []
    for kind in kinds:
        with mlflow.start_run():
            info = mlflow.pyfunc.log_model(name="compressed_model", python_model=str(LITERT_MODEL),
                                           pip_requirements=["mlflow"],
                                           artifacts={"tflite": str(good if kind == "good" else broken)})
        versions.append(int(mlflow.register_model(info.model_uri, name).version))
    return versions


if __name__ == "__main__":
    main()
