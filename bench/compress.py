"""Compression on full Fashion-MNIST: the real prep, train and compress steps; every variant side by side.

Goals (issue #4): pruned + int8, gzipped, >= 10x smaller than the float Keras model gzipped (TensorFlow's
pruning guide reaches 9.5x), with <= 0.3 pt accuracy drop; int8 batch-1 latency >= 2x faster than float
TFLite on this machine's cores, measured in the same run. Needs Debian's dataset-fashion-mnist (or
FASHION_DIR=<folder with the IDX files>).
Run in the steps environment:  .venvs/steps/bin/python bench/compress.py [--epochs 5 --sparsity 0.8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import start_mlflow, stop_mlflow, table, write  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of the float model")
    parser.add_argument("--sparsity", type=float, default=0.82)
    parser.add_argument("--method", default="post_training")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--latency-runs", type=int, default=2000)
    args = parser.parse_args()
    from mlsteps import prep

    work = Path(tempfile.mkdtemp(prefix="bench_compress_"))
    env, url = start_mlflow(work, TF_CPP_MIN_LOG_LEVEL="2")
    try:
        data_root = str(work / "data")
        prepared = prep.run(prep.PrepConfig(data_root=data_root, dataset="fashion_mnist",
                                            source_dir=os.environ.get("FASHION_DIR")))
        common = ["--manifest", prepared["manifest"], "--data-root", data_root, "--run-key", "bench/compress",
                  "--tracking-uri", url]

        def step(module: str, *extra: str) -> dict:
            result = work / f"{module}.json"
            # Each step in its own process, as in a pod; its log lines stream to this terminal.
            subprocess.run([sys.executable, "-m", f"mlsteps.{module}", *common, *extra, "--result-path",
                            str(result)], env=env, check=True)
            return json.loads(result.read_text())

        trained = step("train", "--epochs", str(args.epochs))
        compressed = step("compress", "--model-path", trained["model_path"], "--sparsity", str(args.sparsity),
                          "--method", args.method, "--finetune-epochs", str(args.finetune_epochs),
                          "--threads", str(args.threads), "--latency-runs", str(args.latency_runs))
    finally:
        stop_mlflow(env)

    report = json.loads(Path(compressed["report"]).read_text())
    variants, keras_h5 = report["variants"], report["float_keras"]
    keras_file = Path(trained["model_path"])  # what train saved: .keras with the optimizer state
    import gzip

    keras_file_gz = len(gzip.compress(keras_file.read_bytes(), mtime=0))
    float_latency = variants["float"]["latency_p50_ms"]
    rows = []
    for name, v in variants.items():
        rows.append([name, round(100 * v["accuracy"], 2), round(100 * (keras_h5["accuracy"] - v["accuracy"]), 2),
                     round(100 * (keras_h5["val_accuracy"] - v["val_accuracy"]), 2), v["size_bytes"], v["gzip_bytes"], round(keras_h5["gzip_bytes"] / v["gzip_bytes"], 1),
                     round(v["latency_p50_ms"], 4), round(v["latency_p99_ms"], 4),
                     round(float_latency / v["latency_p50_ms"], 2), round(v["throughput_per_s"]),
                     round(v["sparsity"], 2), "yes" if name == report["chosen"] else ""])
    rows.append(["Keras float (h5, no optimizer)", round(100 * keras_h5["accuracy"], 2), 0.0, 0.0,
                 keras_h5["size_bytes"], keras_h5["gzip_bytes"], 1.0, "", "", "", "", "", ""])
    print(table(["variant", "test acc %", "test drop pt", "val drop pt (gated)", "bytes", "gzip bytes", "x smaller (gz vs Keras)",
                 "p50 ms", "p99 ms", "speed-up vs float", "img/s (batch 256)", "sparsity", "chosen"], rows))
    pruned = next(n for n in variants if n.startswith("pruned"))
    ratio = keras_h5["gzip_bytes"] / variants[pruned]["gzip_bytes"]
    drop = 100 * (keras_h5["accuracy"] - variants[pruned]["accuracy"])
    speedup = float_latency / variants["int8"]["latency_p50_ms"]
    size_ok, speed_ok = ratio >= 10 and drop <= 0.3, speedup >= 2
    print(f"{pruned} gzipped vs float Keras (h5) gzipped: {ratio:.1f}x smaller, drop {drop:.2f} pt "
          f"(goal >= 10x, <= 0.3 pt: {'met' if size_ok else 'NOT met'}); vs train's .keras file with optimizer "
          f"state ({keras_file_gz} B gz): {keras_file_gz / variants[pruned]['gzip_bytes']:.1f}x")
    print(f"int8 batch-1 latency vs float TFLite: {speedup:.2f}x faster (goal >= 2x: {'met' if speed_ok else 'NOT met'});"
          f" {args.threads} thread(s); chosen: {report['chosen']} ({report['reason']})")
    print("written:", write("compress", {
        "settings": vars(args), "float_test_accuracy": keras_h5["accuracy"], "keras_h5": keras_h5,
        "keras_file_gzip_bytes": keras_file_gz, "variants": variants, "chosen": report["chosen"],
        "reason": report["reason"], "pruned_variant": pruned, "pruned_gzip_ratio_vs_keras": ratio,
        "pruned_accuracy_drop_points": drop, "int8_latency_speedup": speedup,
        "goals": {"size_10x_within_0.3pt": size_ok, "int8_latency_2x": speed_ok}}))


if __name__ == "__main__":
    main()
