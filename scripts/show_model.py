"""Print where a registered model version came from: MLflow run URL, version, test accuracy, compression."""

from __future__ import annotations

import argparse

import mlflow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-name", default="mnist_classifier")
    parser.add_argument("--alias", default="challenger")
    args = parser.parse_args()
    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(args.model_name, args.alias)
    except mlflow.exceptions.MlflowException:
        raise SystemExit(f"{args.model_name} has no version with alias {args.alias} at {mlflow.get_tracking_uri()}; "
                         "run mnist_training first (make demo)") from None
    run = client.get_run(version.run_id)
    uri = mlflow.get_tracking_uri().rstrip("/")
    print(f"MLflow run:     {uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}")
    print(f"model version:  {args.model_name} version {version.version} (alias {args.alias})")
    print(f"  registry:     {uri}/#/models/{args.model_name}/versions/{version.version}")
    print(f"test accuracy:  {run.data.metrics.get('test_accuracy', float('nan')):.4f} (float model; the served variant's below)")
    tags = version.tags
    if "compression.variant" in tags:
        print(f"compressed:     {tags['compression.variant']}, {tags['compression.size_bytes']} bytes "
              f"({tags['compression.gzip_bytes']} gzipped), accuracy {float(tags['compression.accuracy']):.4f} "
              f"({-float(tags['compression.accuracy_drop_points']):+.2f} pt)")
        print(f"  why:          {tags.get('compression.reason', '')}")
    if "gate.verdict" in tags:
        print(f"quality gate:   {tags['gate.verdict']} ({tags.get('gate.reasons', '')})")
    print(f"dataset:        {version.tags.get('dataset')} ({version.tags.get('dataset_digest', '')[:16]})")
    params = run.data.params
    def shown(value: str) -> str:
        try:
            return f"{float(value):.3g}"
        except ValueError:
            return value

    chosen = ", ".join(f"{k} {shown(params[k])}" for k in ("learning_rate", "batch_size", "width", "dropout")
                       if k in params)
    origin = run.data.tags.get("hyperparameters.source", "trigger form")
    if origin == "search":
        search = client.get_run(run.data.tags["search.run_id"])
        origin = (f"search trial {run.data.tags.get('search.trial_number')}: "
                  f"{uri}/#/experiments/{search.info.experiment_id}/runs/{search.info.run_id}")
    print(f"hyperparameters: {chosen}")
    print(f"  from:         {origin}")


if __name__ == "__main__":
    main()
