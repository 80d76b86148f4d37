"""Reading what ``prep`` wrote: the manifest and tf.data pipelines over its TFRecord shards."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .core import StepError, is_complete


SPLITS = ("train", "val", "test")
REQUIRED_KEYS = ("digest", "image_shape", "num_classes", "splits")


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read a prepared dataset's manifest; refuse one whose folder was never completed, or is damaged (an
    unreadable manifest, a missing shard, a shard of another size or content than prep wrote: its SHA-256,
    about 0.1 s for all of MNIST)."""
    path = Path(path)
    if not path.is_file():
        raise StepError(f"{path}: manifest not found; run the prep step first (or check --manifest)")
    if not is_complete(path.parent):
        raise StepError(f"{path.parent}: dataset folder is incomplete (no completion marker); run prep again")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StepError(f"{path}: unreadable manifest ({exc}); run prep again (it prepares a damaged dataset "
                        "afresh)") from None
    if missing := _missing(manifest):
        raise StepError(f"{path}: not a manifest written by prep (no {missing}); pass --manifest the "
                        "manifest.json that prep's result names")
    for split in SPLITS:
        entry = manifest["splits"][split]
        unknown = [None] * len(entry["files"])  # older manifests did not record sizes and checksums
        sizes, digests = entry.get("file_bytes") or unknown, entry.get("file_sha256") or unknown
        for name, expected, digest in zip(entry["files"], sizes, digests):
            shard = path.parent / name
            size = shard.stat().st_size if shard.is_file() else None
            if size is None:
                raise StepError(f"{shard}: a shard of the {split} split is missing; run prep again (it prepares "
                                "a damaged dataset afresh)")
            if expected is not None and size != expected:
                raise StepError(f"{shard}: {size} bytes where prep wrote {expected} (damaged or truncated); run "
                                "prep again (it prepares a damaged dataset afresh)")
            if digest is not None and (actual := file_sha256(shard)) != digest:
                raise StepError(f"{shard}: content differs from what prep wrote (sha256 {actual[:12]}..., prep "
                                f"wrote {digest[:12]}...: damaged on disk or overwritten); run prep again (it "
                                "prepares a damaged dataset afresh)")
    manifest["root"] = str(path.parent)
    return manifest


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (a shard of 10,000 MNIST images: about 8 MiB)."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _missing(manifest: Any) -> str:
    """What a manifest written by prep has and ``manifest`` lacks ("" if nothing)."""
    if not isinstance(manifest, dict):
        return "any key"
    if missing := [key for key in REQUIRED_KEYS if key not in manifest]:
        return ", ".join(missing)
    splits = manifest["splits"]
    if not (isinstance(splits, dict) and all(
            isinstance(splits.get(s), dict) and {"count", "files"} <= splits[s].keys() for s in SPLITS)):
        return f"splits {'/'.join(SPLITS)} with their files and counts"
    return ""


def split_files(manifest: dict[str, Any], split: str) -> list[str]:
    return [str(Path(manifest["root"]) / name) for name in manifest["splits"][split]["files"]]


def dataset(manifest: dict[str, Any], split: str, *, batch_size: int, shuffle: bool = False,
            seed: int = 0, cache: bool = True, drop_remainder: bool = False) -> Any:
    """Batches of (float32 images HxW in 0..255, int32 labels); parse in parallel, cache, shuffle, prefetch."""
    return batches(examples(manifest, split, cache=cache), batch_size=batch_size, shuffle=shuffle, seed=seed,
                   drop_remainder=drop_remainder)


def examples(manifest: dict[str, Any], split: str, *, cache: bool = True, limit: int = 0,
             check_count: bool = True) -> Any:
    """Unbatched (uint8 image, int32 label) pairs of one split, cached in memory after the first pass.

    Build it once and call :func:`batches` on it per training run (as the search does per trial) to
    read the shards only once. ``limit`` keeps the first N examples (0: all). ``check_count=False``
    reads whatever the shards hold, for ``validate`` to compare with the manifest itself.
    """
    import tensorflow as tf

    height, width = manifest["image_shape"]
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}

    def parse(records: Any) -> tuple[Any, Any]:
        parsed = tf.io.parse_example(records, spec)
        images = tf.reshape(tf.io.decode_raw(parsed["image"], tf.uint8), [-1, height, width])
        return images, tf.cast(parsed["label"], tf.int32)

    files = split_files(manifest, split)
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=min(len(files), 8))
    # Parse in batches (vectorised), then cache the compact uint8 examples in memory.
    ds = ds.batch(1024).map(parse, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    # A known length lets Keras size its epochs (and fails loudly if the shards disagree with the manifest).
    count = manifest["splits"][split]["count"]
    if check_count:
        ds = ds.apply(tf.data.experimental.assert_cardinality(count))
    if 0 < limit < count:
        ds = ds.take(limit)
    return ds.cache() if cache else ds


def batches(examples: Any, *, batch_size: int, shuffle: bool = False, seed: int = 0,
            drop_remainder: bool = False) -> Any:
    """Shuffled (optionally) float32 batches of :func:`examples`, prefetched (``drop_remainder``: full batches
    only)."""
    import tensorflow as tf

    ds = examples
    if shuffle:
        ds = ds.shuffle(min(int(ds.cardinality()), 20000), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    # A step pod's CPU limit (mlops_airflow.pods sets it for TensorFlow's op pools): tf.data's own pool would
    # otherwise have a thread per core of the node.
    threads = os.environ.get("TF_NUM_INTRAOP_THREADS", "").strip()
    if threads.isdigit() and int(threads) > 0:
        options = tf.data.Options()
        options.threading.private_threadpool_size = int(threads)
        ds = ds.with_options(options)
    return ds


def arrays(manifest: dict[str, Any], split: str, *, check_count: bool = True) -> tuple[Any, Any]:
    """The whole split as numpy arrays (uint8 images, int labels)."""
    import numpy as np

    images, labels = [], []
    split_examples = examples(manifest, split, cache=False, check_count=check_count)
    for x, y in batches(split_examples, batch_size=8192).as_numpy_iterator():
        images.append(x.astype(np.uint8))
        labels.append(y)
    if not images:
        height, width = manifest["image_shape"]
        return np.zeros((0, height, width), np.uint8), np.zeros((0,), np.int32)
    return np.concatenate(images), np.concatenate(labels)
