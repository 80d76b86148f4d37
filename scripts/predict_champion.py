"""Serve the champion with mlsteps.serve for a moment and ask it about one test image, as a client would.

Used at the end of `make demo`: prints the request (as curl), the answer, and the image's true label.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="mnist_classifier")
    parser.add_argument("--data-root", default="var/data")
    args = parser.parse_args()
    client = mlflow.MlflowClient()
    try:
        champion = client.get_model_version_by_alias(args.model_name, "champion")
    except mlflow.exceptions.MlflowException:
        print(f"no champion yet: {args.model_name} has no version with alias champion (the gate did not pass, "
              "or REVIEW was not auto)")
        return 0
    tags = champion.tags
    manifest = Path(args.data_root) / "datasets" / tags["dataset"] / tags["dataset_digest"][:16] / "manifest.json"
    from mlsteps import data

    images, labels = data.arrays(data.load_manifest(manifest), "test")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlsteps.serve", "--model-name", args.model_name,
                               "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    print("the model server did not become ready; run it by hand to see why:\n"
                          f"  python -m mlsteps.serve --model-name {args.model_name} --port 8501")
                    return 1
                time.sleep(0.3)
        body = json.dumps({"instances": images[:1].astype(float).tolist()}).encode()
        request = urllib.request.Request(f"{base}/v1/models/{args.model_name}:predict", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.load(response)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    probabilities = answer["predictions"][0]
    predicted = max(range(len(probabilities)), key=probabilities.__getitem__)
    names = data.load_manifest(manifest)["class_names"]
    print(f"served champion: {args.model_name} version {answer['model_version']} "
          f"({tags.get('compression.variant', 'float')}) via python -m mlsteps.serve")
    print(f"  request:      curl -X POST localhost:8501/v1/models/{args.model_name}:predict "
          "-d '{\"instances\": [<28x28 pixels of test image 0>]}'")
    print(f"  answer:       {names[predicted]} ({probabilities[predicted]:.1%}); true label: {names[labels[0]]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
