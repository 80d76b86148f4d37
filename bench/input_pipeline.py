"""TFRecord input pipeline vs in-memory arrays: training throughput of the same model, side by side.

Goal (issue #2): the pipeline train uses (mlsteps.data.dataset over the TFRecord shards) delivers
>= 0.95x the images/s of the same model fed from in-memory numpy arrays (Keras fit(x, y)); tf.data over
the same arrays (from_tensor_slices) is shown too. After one full warm-up epoch per feed (parsing, cache
fill, tracing; reported apart), the feeds train in short interleaved chunks, in rotating order, so that
the minutes-long slow phases of a shared VM hit every feed alike; the ratio compares medians.
Run in the steps environment:  .venvs/steps/bin/python bench/input_pipeline.py [--rounds 12 --chunk-steps 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--chunk-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    import keras
    import numpy as np
    import tensorflow as tf

    from mlsteps import data, model, prep
    from mlsteps.core import setup_logging

    setup_logging()
    work = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    prepared = prep.run(prep.PrepConfig(data_root=str(work), dataset="fashion_mnist",
                                        source_dir=os.environ.get("FASHION_DIR")))
    manifest = data.load_manifest(prepared["manifest"])
    n = manifest["splits"]["train"]["count"]
    images, labels = data.arrays(manifest, "train")
    pixels = images.astype("float32")
    bs, chunk = args.batch_size, args.chunk_steps
    streams = {
        "tfrecord": data.dataset(manifest, "train", batch_size=bs, shuffle=True, seed=1).repeat(),
        "tensor_slices": tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(20000, seed=1).repeat()
        .batch(bs).map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(tf.data.AUTOTUNE),
    }
    rng = np.random.default_rng(1)
    order = rng.permutation(n)
    position = 0
    nets = {}
    for name in ("tfrecord", "arrays", "tensor_slices"):
        keras.utils.set_random_seed(1)
        nets[name] = model.build(image_shape=tuple(manifest["image_shape"]), num_classes=manifest["num_classes"])
        nets[name].compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    epoch_counter = dict.fromkeys(nets, 0)

    def train(name: str, steps: int) -> float:
        """Train ``steps`` batches from one feed; return seconds."""
        nonlocal position, order
        net, start_epoch = nets[name], epoch_counter[name]
        epoch_counter[name] += 1
        started = time.perf_counter()
        if name == "arrays":
            take = steps * bs
            if position + take > n:
                order, position = rng.permutation(n), 0
            picked = order[position:position + take]
            position += take
            net.fit(pixels[picked], labels[picked], batch_size=bs, shuffle=False, verbose=0,
                    initial_epoch=start_epoch, epochs=start_epoch + 1)
        else:
            net.fit(streams[name], steps_per_epoch=steps, verbose=0, initial_epoch=start_epoch,
                    epochs=start_epoch + 1)
        return time.perf_counter() - started

    full = -(-n // bs)
    first = {}
    for name in nets:
        first[name] = train(name, full)
        print(f"warm-up epoch {name}: {first[name]:.1f} s ({full * bs / first[name]:.0f} images/s)", flush=True)
    samples: dict[str, list[float]] = {name: [] for name in nets}
    names = list(nets)
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            samples[name].append(chunk * bs / train(name, chunk))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in samples.items())
              + " images/s", flush=True)
    median = {name: statistics.median(v) for name, v in samples.items()}
    best = {name: max(v) for name, v in samples.items()}
    ratio = median["tfrecord"] / median["arrays"]
    print(table(["feed", "warm-up epoch images/s", "median images/s", "best images/s"],
                [[name, round(full * bs / first[name]), round(median[name]), round(best[name])] for name in nets]))
    print(table(["ratio tfrecord/arrays (median)", "ratio (best)", "goal >= 0.95"],
                [[round(ratio, 3), round(best["tfrecord"] / best["arrays"], 3), "yes" if ratio >= 0.95 else "no"]]))
    print("written:", write("input_pipeline", {
        "batch_size": bs, "chunk_steps": chunk, "rounds": args.rounds, "examples": n,
        "warmup_epoch_seconds": first, "chunk_images_per_second": samples, "median_images_per_second": median,
        "best_images_per_second": best, "ratio_median": ratio, "ratio_best": best["tfrecord"] / best["arrays"]}))


if __name__ == "__main__":
    main()
