"""Print where a registered model version came from: MLflow run URL, version, test accuracy, compression."""

from __future__ import annotations

import argparse

from registry_lookup import tracking_uri, version_by_alias


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-name", default="mnist_classifier")
    parser.add_argument("--alias", default="challenger")
    args = parser.parse_args()
    uri = tracking_uri().rstrip("/")
    import mlflow

    client = mlflow.MlflowClient(uri)
    version = version_by_alias(client, uri, args.model_name, args.alias)
    if version is None:
        raise SystemExit(f"{args.model_name} has no version with alias {args.alias} at {uri}; "
                         "run mnist_training first (make demo)")
    run = client.get_run(version.run_id)
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
        start = ""
        if search.data.tags.get("search.best_is_start_point") == "true":  # what the search started from won
            label = search.data.tags.get("search.start_point", "").split(": ", 1)[0]
            start = f", the start point ({label}), which no trial beat"
        origin = (f"search trial {run.data.tags.get('search.trial_number')}{start}: "
                  f"{uri}/#/experiments/{search.info.experiment_id}/runs/{search.info.run_id}")
    print(f"hyperparameters: {chosen}")
    print(f"  from:         {origin}")


if __name__ == "__main__":
    main()
