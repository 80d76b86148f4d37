"""prep: obtain the four IDX files, verify and parse them, write sharded TFRecords and a manifest.

Files are looked for in the user's folder, then the cache under the data root, then the folders where
OS packages install datasets (Debian's ``dataset-fashion-mnist``), and only then downloaded from the
dataset's public mirrors. The output lives under a content-addressed path, so the same data is never
prepared twice, and it appears there only once complete.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from . import data, datasets, idx
from .core import (ABANDONED_AFTER_S, COMPLETE_MARKER, StepError, atomic_directory, cli, field, is_complete,
                   seed_error, without_password, write_problem)

log = logging.getLogger("mlsteps.prep")

# Bump when the TFRecord layout changes, so old outputs are not mistaken for new ones.
FORMAT_VERSION = 1


class DatasetChecksumError(StepError):
    """A dataset file whose SHA-256 is not one of the known digests."""


class DatasetUnavailableError(StepError):
    """No local copy and no mirror could deliver a file."""


class CacheWriteError(StepError):
    """A download could not be written into the cache (disk full, quota, permissions): no mirror can help."""


UNVERIFIED = "unverified"  # cache/<name>/unverified/: downloads made with --verify-checksums false


@dataclass(frozen=True)
class PrepConfig:
    data_root: str = field(help="root folder for caches and prepared datasets (a shared PVC in production)")
    dataset: str = field("mnist", help=f"one of {', '.join(datasets.DATASET_NAMES)}")
    source_dir: str | None = field(None, help="folder holding the four IDX files (.gz or raw); skips search and download")
    mirrors: tuple[str, ...] | None = field(None, help="comma-separated base URLs to download from, overriding the dataset's own")
    verify_checksums: bool = field(True, help="check files against the known SHA-256 digests (not possible for 'custom')")
    val_fraction: float = field(0.1, help="share of the training set held out for per-epoch validation")
    records_per_shard: int = field(10000, help="TFRecord examples per shard file")
    num_classes: int = field(0, help="classes of a 'custom' dataset (0: largest label + 1, at least 2)")
    download_timeout: float = field(30.0, help="seconds a download attempt may wait for data (to connect, or "
                                               "between two reads) before it gives up")
    seed: int = field(1234, help="seed of the train/validation split")


def _spec(config: PrepConfig) -> datasets.DatasetSpec:
    if config.dataset == "custom":
        if not config.source_dir:
            raise StepError("dataset 'custom' needs --source-dir pointing at a folder with the four IDX files")
        return datasets.custom(config.num_classes)
    try:
        return datasets.KNOWN[config.dataset]
    except KeyError:
        raise StepError(f"unknown dataset {config.dataset!r}; choose one of {', '.join(datasets.DATASET_NAMES)}") from None


def _find_in(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


# What may heal within seconds: a timeout, a connection reset or dropped mid-body (HTTPException: IncompleteRead,
# or a reply that was no HTTP). A DNS failure, a refused or unreachable host, a certificate error or a file://
# path that does not exist will not: prep tries the next mirror at once.
_TRANSIENT = (TimeoutError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError, http.client.HTTPException)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    if isinstance(exc, urllib.error.URLError):
        return isinstance(exc.reason, _TRANSIENT)
    return isinstance(exc, _TRANSIENT)


def _unreachable(exc: BaseException) -> bool:
    """Whether a mirror's failure (retries spent) says it serves nothing at all now, so that the other files
    skip it (a mirror that times out would cost each of them its retries); a file it lacks (HTTP 404, a
    file:// path) or serves damaged says nothing of the others."""
    if isinstance(exc, urllib.error.HTTPError):
        return False
    if isinstance(exc, urllib.error.URLError):
        return not isinstance(exc.reason, FileNotFoundError)
    return isinstance(exc, (TimeoutError, socket.gaierror, ConnectionRefusedError))


def _cache_error(path: Path, exc: OSError) -> CacheWriteError:
    return CacheWriteError(f"cannot write the download into {path.parent} ({exc.strerror or exc}): free space "
                           "there or make it writable (a pod runs as UID 10001), or point --data-root at "
                           "another folder; no mirror was at fault")


@retry(stop=stop_after_attempt(3), wait=wait_exponential(multiplier=1, max=8),
       retry=retry_if_exception(_is_transient), reraise=True)
def _download(url: str, dest: Path, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        try:
            out = dest.open("wb")
        except OSError as exc:
            raise _cache_error(dest, exc) from exc
        with out:
            total = int(response.headers.get("Content-Length") or 0)
            done, last_report = 0, 0.0
            while chunk := response.read(1 << 20):
                try:
                    out.write(chunk)
                except OSError as exc:  # the disk's error, not the mirror's: no other mirror would do better
                    raise _cache_error(dest, exc) from exc
                done += len(chunk)
                if time.monotonic() - last_report > 2 or done == total:
                    share = f"{100 * done / total:.0f}%" if total else "?"
                    log.info("downloading %s: %.1f MiB (%s)", url, done / 2**20, share)
                    last_report = time.monotonic()
            if total and done != total:
                # urllib ends a short body quietly when the server closes the connection early.
                raise ConnectionResetError(f"connection closed after {done} of {total} bytes")
            try:
                out.flush()
                os.fsync(out.fileno())  # on the disk before the rename into the cache (a crash leaves no empty file)
            except OSError as exc:
                raise _cache_error(dest, exc) from exc


def _remove_abandoned_downloads(folder: Path) -> None:
    """Temporary download files left by a prep killed outright (SIGKILL, OOM, node loss: no cleanup ran), once
    older than any download takes."""
    cutoff = time.time() - ABANDONED_AFTER_S
    for left in folder.glob(".*.download"):
        try:
            if left.stat().st_mtime < cutoff:
                log.warning("removing %s: the download of a prep killed more than %d h ago", left,
                            ABANDONED_AFTER_S // 3600)
                left.unlink()
        except OSError:
            pass


def _verifiable(config: PrepConfig, data_file: datasets.DataFile) -> bool:
    """Whether this file is checked against known digests (asked for, and known: not for 'custom')."""
    return config.verify_checksums and bool(data_file.sha256 or data_file.content_sha256)


def _obtain(spec: datasets.DatasetSpec, config: PrepConfig, data_file: datasets.DataFile,
            unreachable: dict[str, str] | None = None) -> Path:
    """Return a local path for one file, downloading it into the cache when no copy exists.

    ``unreachable``: mirrors that served nothing for an earlier file (URL -> why), skipped; filled in here.
    """
    if config.source_dir:
        if not Path(config.source_dir).is_dir():
            raise StepError(f"--source-dir {config.source_dir}: no such folder; give the folder that holds the "
                            "four IDX files (or leave it empty to use the cache, the system folders or a download)")
        found = _find_in(Path(config.source_dir), data_file.name)
        if found is None:
            raise StepError(f"{config.source_dir}: missing {data_file.name} (or its uncompressed form "
                            f"{data_file.name.removesuffix('.gz')}); the folder must hold all four IDX files")
        return found
    cache = Path(config.data_root) / "cache" / spec.name
    verified = _verifiable(config, data_file)
    # A download not checked against the known digests is kept apart: under the official name it would be
    # taken for the official file by every later run (a checked run would then fail on it; an unchecked one
    # would train on it as this dataset without a word).
    downloads = cache if verified else cache / UNVERIFIED
    searched = [cache, *([downloads] if not verified else []), *map(Path, spec.system_dirs)]
    for folder in searched:
        if found := _find_in(folder, data_file.name):
            return found
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StepError(f"--data-root {config.data_root}: cannot create {downloads} ({exc.strerror or exc}); give "
                        "a folder this step can write (a pod runs as UID 10001)") from exc
    _remove_abandoned_downloads(downloads)
    unreachable = {} if unreachable is None else unreachable
    errors = []
    for base in config.mirrors or spec.mirrors:
        url = base.rstrip("/") + "/" + data_file.name
        shown = without_password(url)
        if base in unreachable:
            errors.append(f"{shown}: skipped, {unreachable[base]}")
            continue
        # A name of its own: two preps downloading the same file at once (make demo beside a DAG run on one
        # data root, a retried pod while the old one still runs) would otherwise write into one file.
        try:
            handle, name = tempfile.mkstemp(dir=downloads, prefix=f".{data_file.name}.", suffix=".download")
            os.fchmod(handle, 0o644)  # as a plain download would be: readable by whoever else uses the cache
            os.close(handle)
        except OSError as exc:
            raise _cache_error(downloads / data_file.name, exc) from exc
        partial = Path(name)
        try:
            _download(url, partial, config.download_timeout)
            raw = partial.read_bytes()
            # Parsed before it is verified or cached: an error page served as the file is named as such (not
            # as a checksum mismatch) and prep tries the next mirror instead of failing on a cached page.
            try:
                idx.parse(partial, idx.decompress(partial, raw), expect_ndim=_ndim(data_file))
            except idx.IdxFormatError as exc:
                if raw[:2] in (b"\x1f\x8b", b"\0\0"):  # a gzip stream, or an IDX header (it starts 0x0000)
                    raise StepError(f"served a damaged file: {exc.reason}") from exc
                raise StepError(f"served something that is not an IDX file (it starts with {raw[:24]!r}): a web "
                                "page from a proxy or captive portal, or a moved file") from exc
            _verify(spec, config, data_file, partial, raw, downloaded=True)
            target = downloads / data_file.name
            try:
                os.replace(partial, target)  # another prep's copy of the same file may have landed meanwhile
            except OSError as exc:
                raise _cache_error(target, exc) from exc
            if not verified:
                log.warning("%s was not checked against the known %s checksums (--verify-checksums false): "
                            "cached apart, in %s", data_file.name, spec.name, downloads)
            return target
        except CacheWriteError:
            raise
        except (OSError, urllib.error.URLError, http.client.HTTPException, StepError) as exc:
            # StepError: bad checksum or not IDX; HTTPException: the connection dropped mid-body
            errors.append(f"{shown}: {getattr(exc, 'reason', exc)}")
            log.warning("mirror failed: %s", errors[-1])
            if _unreachable(exc):
                unreachable[base] = f"it failed for {data_file.name}"
        finally:  # whatever ended the download (SIGTERM's SystemExit too); nothing once it took its name
            partial.unlink(missing_ok=True)
    tried = "\n  ".join(errors) or "(no mirrors configured)"
    unchecked = cache / UNVERIFIED / data_file.name
    kept_apart = (f"An unchecked copy is in {unchecked}, which only --verify-checksums false uses.\n"
                  if verified and _find_in(cache / UNVERIFIED, data_file.name) else "")
    raise DatasetUnavailableError(
        f"cannot obtain {spec.name} file {data_file.name}: no local copy in "
        f"{', '.join(map(str, searched))}, and every mirror failed:\n  {tried}\n{kept_apart}"
        "If this machine is offline, point prep at local IDX files with --source-dir DIR "
        "(make demo SOURCE_DIR=DIR), or use DATASET=fashion_mnist after "
        "'apt-get install dataset-fashion-mnist', which installs them under /usr/share/datasets/.")


def _ndim(data_file: datasets.DataFile) -> int:
    return 3 if data_file.role.endswith("images") else 1


def _verify(spec: datasets.DatasetSpec, config: PrepConfig, data_file: datasets.DataFile,
            path: Path, raw: bytes, *, downloaded: bool = False) -> bytes:
    """Check one file against the known digests; return its decompressed IDX payload.

    ``downloaded``: a file just downloaded to a temporary path; its errors are listed after the mirror's URL.
    """
    payload = idx.decompress(path, raw)
    named = "" if downloaded else f"{path}: "
    if not _verifiable(config, data_file):
        return payload
    digest = hashlib.sha256(raw).hexdigest()
    if digest in data_file.sha256:
        return payload
    if data_file.content_sha256 and hashlib.sha256(payload).hexdigest() == data_file.content_sha256:
        return payload
    if raw[:2] != b"\x1f\x8b" and not data_file.content_sha256:
        raise DatasetChecksumError(
            f"{named}uncompressed, and only the official {data_file.name} archive's SHA-256 is known for "
            f"{spec.name}, so it cannot be verified. Use the original .gz file, or trust this copy: "
            "--verify-checksums false, or dataset 'custom' in the trigger form.")
    content = hashlib.sha256(payload).hexdigest()
    other = next((known.name for known in datasets.KNOWN.values() if known.name != spec.name
                  for f in known.files if f.role == data_file.role
                  and (digest in f.sha256 or content == f.content_sha256)), None)
    if other:
        raise DatasetChecksumError(
            f"{named}this is the {other} {data_file.name}, not {spec.name}'s: prepare dataset {other} "
            f"(make demo DATASET={other}; the trigger form's dataset; --dataset {other})")
    if downloaded:
        raise DatasetChecksumError(
            f"SHA-256 {digest} does not match the known {spec.name} checksum(s) {', '.join(data_file.sha256)}: "
            f"this mirror serves another file than the official {data_file.name} (nothing of it was kept)")
    cached = Path(config.data_root).resolve() / "cache" in path.resolve().parents
    remedy = ("Delete it and run prep again (it is downloaded again)" if cached else
              "If these are your own IDX files, prepare them as dataset custom (make demo DATASET=custom "
              "SOURCE_DIR=...; the trigger form's dataset; --dataset custom), or trust this copy with "
              "--verify-checksums false")
    raise DatasetChecksumError(
        f"{path}: SHA-256 {digest} does not match the known {spec.name} checksum(s) "
        f"{', '.join(data_file.sha256)}; the file is corrupt or not the official {data_file.name}. {remedy}.")


def _load(spec: datasets.DatasetSpec,
          config: PrepConfig) -> tuple[dict[str, np.ndarray], dict[str, Any], datasets.DatasetSpec]:
    """The four arrays, where they came from, and the spec (a custom dataset's classes counted from its labels)."""
    arrays: dict[str, np.ndarray] = {}
    sources: dict[str, Any] = {}
    content = hashlib.sha256()
    unreachable: dict[str, str] = {}
    for data_file in spec.files:
        path = _obtain(spec, config, data_file, unreachable)
        raw = path.read_bytes()
        payload = _verify(spec, config, data_file, path, raw)
        arrays[data_file.role] = idx.parse(path, payload, expect_ndim=_ndim(data_file))
        content.update(hashlib.sha256(payload).digest())
        sources[data_file.role] = {"path": str(path), "sha256": hashlib.sha256(raw).hexdigest()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise idx.IdxFormatError(f"{split} split: {len(images)} images but {len(labels)} labels "
                                     f"({sources[f'{split}_images']['path']}, {sources[f'{split}_labels']['path']})")
        if not len(images):
            raise idx.IdxFormatError(f"{sources[f'{split}_images']['path']}: holds no images; the {split} split "
                                     "needs some")
    if spec.name == "custom" and not config.num_classes:
        spec = datasets.custom(max(2, 1 + max(int(arrays[r].max()) for r in ("train_labels", "test_labels"))))
        log.info("custom dataset: %d classes (labels 0..%d)", len(spec.class_names), len(spec.class_names) - 1)
    num_classes = len(spec.class_names)
    lowest = int(min(arrays["train_labels"].min(), arrays["test_labels"].min()))
    # Labels numbered from 1 (1..10 for ten classes): the most common way a custom dataset misses label 0.
    from_one = (f"; if the labels start at {lowest}, number them from 0 instead (subtract {lowest})"
                if lowest > 0 and spec.name == "custom" else "")
    for role in ("train_labels", "test_labels"):
        labels = arrays[role]
        if len(labels) and int(labels.max()) >= num_classes:
            bad = int(np.argmax(labels >= num_classes))
            raise idx.IdxFormatError(f"{sources[role]['path']}: label {int(labels[bad])} at index {bad} is out of "
                                     f"range 0..{num_classes - 1}" + (
                                         f"; give --num-classes {int(labels.max()) + 1} or more, or 0 to count "
                                         "them from the labels" + from_one if spec.name == "custom" else
                                         f": not a {spec.name} labels file"))
    if spec.name == "custom" and not config.num_classes:
        # Counted from the labels (the DAG's way): a class no training example has cannot be learned, and
        # validate would refuse the prepared dataset on every try ("smallest class ... holds 0.00%").
        missing = np.flatnonzero(np.bincount(arrays["train_labels"], minlength=num_classes) == 0).tolist()
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise idx.IdxFormatError(
                f"{sources['train_labels']['path']}: no training example has label {shown}, so these labels "
                f"do not make {num_classes} classes 0..{num_classes - 1}: number the classes 0..K-1 without "
                f"gaps{from_one}")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise idx.IdxFormatError(
            f"train images are {arrays['train_images'].shape[1:]} ({sources['train_images']['path']}) but test "
            f"images are {arrays['test_images'].shape[1:]} ({sources['test_images']['path']}): both splits need "
            "one image size (resize one of them)")
    sources["content_sha256"] = content.hexdigest()
    return arrays, sources, spec


def _write_split(tf: Any, folder: Path, split: str, images: np.ndarray, labels: np.ndarray,
                 per_shard: int) -> list[str]:
    shards = max(1, math.ceil(len(images) / per_shard))
    names = []
    for shard in range(shards):
        name = f"{split}-{shard:05d}-of-{shards:05d}.tfrecord"
        with tf.io.TFRecordWriter(str(folder / name)) as writer:
            for i in range(shard * per_shard, min(len(images), (shard + 1) * per_shard)):
                example = tf.train.Example(features=tf.train.Features(feature={
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[images[i].tobytes()])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(labels[i])])),
                }))
                writer.write(example.SerializeToString())
        names.append(name)
    return names


def _stratified_split(labels: np.ndarray, fraction: float, seed: int,
                      class_names: tuple[str, ...] | list[str] = ()) -> tuple[np.ndarray, np.ndarray, bool]:
    """Hold out ``fraction`` of every class (at least one example each, and at least one left to train on),
    shuffled reproducibly; return (val, train, whether a class kept a training example only by that rule).
    A class with a single training example cannot be in both splits: refused."""
    if not len(labels):
        raise StepError("the training set has no examples: nothing to train or validate on")
    classes, counts = np.unique(labels, return_counts=True)
    alone = [(int(c), int(n)) for c, n in zip(classes, counts) if n < 2]
    if alone:
        named = ", ".join(f"{c} ({class_names[c]!r})" if c < len(class_names) else str(c) for c, _ in alone)
        raise StepError(f"class {named} has a single training example: each class needs at least 2 (one to "
                        "train on, one to validate on); add examples of it, or leave it out of the labels")
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    capped = False
    for label in classes:
        members = rng.permutation(np.flatnonzero(labels == label))
        wanted = max(1, round(len(members) * fraction))
        capped |= wanted >= len(members)
        held.append(members[:min(len(members) - 1, wanted)])
    val = rng.permutation(np.concatenate(held))
    train = rng.permutation(np.setdiff1d(np.arange(len(labels)), val))
    return val, train, capped


def run(config: PrepConfig) -> dict[str, Any]:
    """Prepare the dataset (or find it already prepared) and return where its manifest is."""
    if not 0 < config.val_fraction < 1:
        raise StepError(f"--val-fraction must be between 0 and 1, got {config.val_fraction}")
    if config.records_per_shard < 1:
        raise StepError(f"--records-per-shard must be at least 1, got {config.records_per_shard}")
    if config.num_classes < 0 or config.num_classes == 1:
        raise StepError(f"--num-classes must be 0 (count them from the labels) or at least 2, got {config.num_classes}")
    if error := seed_error(config.seed):
        raise StepError(error)
    if not (math.isfinite(config.download_timeout) and config.download_timeout > 0):
        raise StepError(f"--download-timeout must be a number of seconds > 0, got {config.download_timeout:g}")
    for mirror in config.mirrors or ():
        parts = urllib.parse.urlsplit(mirror)
        if parts.scheme not in ("http", "https", "file"):
            raise StepError(f"--mirrors: {without_password(mirror)!r} is not an http(s):// or file:// URL, e.g. "
                            "https://ossci-datasets.s3.amazonaws.com/mnist/")
        if "@" in parts.netloc:  # urllib sends no credentials from a URL: it takes them for the host and port
            raise StepError(f"--mirrors: {without_password(mirror)!r} holds a user name or password, which "
                            "prep's downloads cannot send; serve the files without them, give the folder with "
                            "--source-dir, or copy the four files into "
                            f"{Path(config.data_root) / 'cache' / config.dataset}/")
        if parts.query or parts.fragment:  # the file's name is appended to the path: it would land in these
            raise StepError(f"--mirrors: {without_password(mirror)!r} has a query or fragment (?... or #...); "
                            "a mirror is a folder URL the four file names are appended to (e.g. "
                            "https://ossci-datasets.s3.amazonaws.com/mnist/): a pre-signed URL signs one file, "
                            "not a folder, so give the folder with --source-dir instead")
    spec = _spec(config)
    arrays, sources, spec = _load(spec, config)
    settings = {"format_version": FORMAT_VERSION, "class_names": list(spec.class_names),
                "val_fraction": config.val_fraction,
                "records_per_shard": config.records_per_shard, "seed": config.seed}
    # Before the cache: a class of one example is refused however it was prepared before.
    val_index, train_index, capped = _stratified_split(arrays["train_labels"], config.val_fraction, config.seed,
                                                      spec.class_names)
    if capped:
        # Split rule 2 keeps a training example of every class where rule 1 held them all out: another split,
        # so another digest (datasets where both rules agree, MNIST's and Fashion-MNIST's, keep theirs).
        settings["split_rule"] = 2
    digest = hashlib.sha256(json.dumps({"content": sources["content_sha256"], **settings},
                                       sort_keys=True).encode()).hexdigest()
    out = Path(config.data_root) / "datasets" / spec.name / digest[:16]
    manifest_path = out / "manifest.json"
    if is_complete(out):
        try:
            splits = data.load_manifest(manifest_path)["splits"]
        except StepError as damaged:  # what the other steps refuse it for: prepared again, replacing it
            log.warning("the prepared dataset is damaged, preparing it again: %s", damaged)
            (out / COMPLETE_MARKER).unlink(missing_ok=True)
        else:
            log.info("dataset %s already prepared at %s (digest %s)", spec.name, out, digest[:16])
            return {"manifest": str(manifest_path), "digest": digest, "dataset": spec.name, "cached": True,
                    "counts": {k: v["count"] for k, v in splits.items()}, "config": asdict(config)}

    splits = {
        "train": (arrays["train_images"][train_index], arrays["train_labels"][train_index]),
        "val": (arrays["train_images"][val_index], arrays["train_labels"][val_index]),
        "test": (arrays["test_images"], arrays["test_labels"]),
    }
    if problem := write_problem(manifest_path):
        raise StepError(f"--data-root {config.data_root}: cannot write the prepared dataset there ({problem}); "
                        "give a folder this step can write (a pod runs as UID 10001)")
    import tensorflow as tf  # heavy: only once there is work to do

    with atomic_directory(out) as scratch:
        manifest: dict[str, Any] = {
            "dataset": spec.name, "digest": digest, "sources": sources, "settings": settings,
            "image_shape": list(arrays["train_images"].shape[1:]), "dtype": "uint8",
            "num_classes": len(spec.class_names), "class_names": list(spec.class_names),
            "expected_counts": spec.expected_counts, "splits": {},
        }
        for split, (images, labels) in splits.items():
            log.info("writing %s split: %d examples", split, len(images))
            files = _write_split(tf, scratch, split, images, labels, config.records_per_shard)
            histogram = np.bincount(labels, minlength=len(spec.class_names))
            manifest["splits"][split] = {"count": int(len(images)), "files": files,
                                         "file_bytes": [(scratch / name).stat().st_size for name in files],
                                         "file_sha256": [data.file_sha256(scratch / name) for name in files],
                                         "class_histogram": histogram.tolist()}
        (scratch / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("prepared %s at %s (digest %s)", spec.name, out, digest[:16])
    return {"manifest": str(manifest_path), "digest": digest, "dataset": spec.name, "cached": False,
            "counts": {k: v["count"] for k, v in manifest["splits"].items()}, "config": asdict(config)}


def main(argv: list[str] | None = None) -> int:
    return cli(run, PrepConfig, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
