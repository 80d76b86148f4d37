"""Full Fashion-MNIST (60k/10k) through the real prep, train and evaluate steps on this machine's CPUs.

Goal (issue #2): test accuracy >= 92 % with <= 100K parameters within 5 epochs; report seconds per epoch
and images per second. Needs Debian's dataset-fashion-mnist (or FASHION_DIR=<folder with the IDX files>).
Run in the steps environment:  .venvs/steps/bin/python bench/train_fashion.py [--epochs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import start_mlflow, stop_mlflow, table, write  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    from mlsteps import evaluate, prep, train
    from mlsteps.core import setup_logging

    setup_logging()  # the steps' own progress lines

    work = Path(tempfile.mkdtemp(prefix="bench_fashion_"))
    env, url = start_mlflow(work)
    try:
        import mlflow

        data_root = str(work / "data")
        prepared = prep.run(prep.PrepConfig(data_root=data_root, dataset="fashion_mnist",
                                            source_dir=os.environ.get("FASHION_DIR")))
        key = "bench/fashion"
        trained = train.run(train.TrainConfig(manifest=prepared["manifest"], data_root=data_root, run_key=key,
                                              tracking_uri=url, epochs=args.epochs))
        evaluated = evaluate.run(evaluate.EvaluateConfig(manifest=prepared["manifest"], data_root=data_root,
                                                         model_path=trained["model_path"], run_key=key,
                                                         tracking_uri=url))
        client = mlflow.MlflowClient(url)
        run_id = trained["mlflow_run_id"]

        def per_epoch(metric: str) -> list[float]:
            return [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)]

        # images_per_second: the training pass's (train_seconds); epoch_seconds adds the validation pass.
        seconds, training = per_epoch("epoch_seconds"), per_epoch("train_seconds")
        rates, val_accuracy = per_epoch("images_per_second"), per_epoch("val_accuracy")
        accuracy = evaluated["metrics"]["test_accuracy"]
        params = trained["parameters"]
        print(table(["epoch", "epoch s", "training s", "training images/s", "val accuracy"],
                    [[i + 1, round(s, 1), round(t, 1), round(r), round(v, 4)] for i, (s, t, r, v) in
                     enumerate(zip(seconds, training, rates, val_accuracy))]))
        ok = accuracy >= 0.92 and params <= 100_000 and args.epochs <= 5
        print(table(["parameters", "epochs", "median s/epoch", "median training images/s", "test accuracy",
                     "goal met"],
                    [[params, args.epochs, round(statistics.median(seconds), 1), round(statistics.median(rates)),
                      round(accuracy, 4), "yes" if ok else "no"]]))
        print("written:", write("train_fashion", {
            "parameters": params, "epochs": args.epochs, "epoch_seconds": seconds, "train_seconds": training,
            "images_per_second": rates,
            "val_accuracy": val_accuracy, "test_accuracy": accuracy, "train_examples": 54000, "goal": ">=0.92 accuracy, <=100K params, <=5 epochs",
            "goal_met": ok}))
    finally:
        stop_mlflow(env)


if __name__ == "__main__":
    main()
