"""Ask the running model server about one test image, as a client would; print the request and the answer.

Used at the end of `make demo`, after model_promotion deployed the champion to the local server
(scripts/serving.sh): prints the request (as curl), the answer, and the image's true label.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from registry_lookup import tracking_uri, version_by_alias

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="mnist_classifier")
    parser.add_argument("--data-root", default=os.environ.get("MLOPS_DATA_ROOT") or str(ROOT / "var" / "data"),
                        help="where prep put the datasets (default: $MLOPS_DATA_ROOT, else <repo>/var/data)")
    parser.add_argument("--url", default="http://127.0.0.1:8501", help="the model server")
    args = parser.parse_args()
    uri = tracking_uri()
    import mlflow

    champion = version_by_alias(mlflow.MlflowClient(uri), uri, args.model_name, "champion")
    if champion is None:
        print(f"no champion yet: {args.model_name} has no version with alias champion (the gate did not pass, "
              "REVIEW was not auto, or a failed first promotion removed it): nothing is served")
        return 0
    tags = champion.tags
    from mlsteps import data
    from mlsteps.core import StepError

    try:
        manifest = (Path(args.data_root) / "datasets" / tags["dataset"] / tags["dataset_digest"][:16]
                    / "manifest.json")
        images, labels = data.arrays(data.load_manifest(manifest), "test")
    except KeyError as exc:
        print(f"{args.model_name} version {champion.version} has no {exc} tag: it was not registered by the "
              "pipeline's register step, so its test images are unknown", file=sys.stderr)
        return 1
    except StepError as exc:
        print(f"{exc}\n(the champion's dataset is not under --data-root {args.data_root}: point it at the "
              "data root prep wrote to)", file=sys.stderr)
        return 1
    body = json.dumps({"instances": images[:1].astype(float).tolist()}).encode()
    request = urllib.request.Request(f"{args.url}/v1/models/{args.model_name}:predict", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as exc:
        print(f"the model server at {args.url} answered HTTP {exc.code}: {exc.read().decode()[:300]}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"no model server at {args.url} ({exc}); start it: scripts/serving.sh start", file=sys.stderr)
        return 1
    probabilities = answer["predictions"][0]
    predicted = max(range(len(probabilities)), key=probabilities.__getitem__)
    names = data.load_manifest(manifest)["class_names"]
    print(f"served champion: {args.model_name} version {answer['model_version']} "
          f"({tags.get('compression.variant', 'float')}) at {args.url} (scripts/serving.sh; stop: make serving-stop)")
    print(f"  request:      curl -X POST {args.url}/v1/models/{args.model_name}:predict "
          "-d '{\"instances\": [<28x28 pixels of test image 0>]}'")
    print(f"  answer:       {names[predicted]} ({probabilities[predicted]:.1%}); true label: {names[labels[0]]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
