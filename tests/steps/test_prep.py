"""prep from local folders: content-addressed output, stratified split, caching, and clean failures."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import idxdata
import numpy as np
import pytest
from stepsupport import datasets_entries, partial_leftovers

from mlsteps import core, data, datasets, idx, prep
from mlsteps.core import StepError
from mlsteps.idx import IdxFormatError


def _tree(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its modification time in nanoseconds."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw-idx"])
def test_custom_dataset_is_written_under_content_digest_with_marker(tmp_path, data_root, prepare, gz) -> None:
    source = idxdata.write_dataset(tmp_path / "source", gz=gz)
    result = prepare(source)

    manifest_path = Path(result["manifest"])
    out = manifest_path.parent
    assert result["cached"] is False
    assert out == data_root / "datasets" / "custom" / result["digest"][:16]
    assert (out / core.COMPLETE_MARKER).is_file()
    manifest = json.loads(manifest_path.read_text())
    assert manifest["digest"] == result["digest"]
    assert manifest["image_shape"] == [28, 28]
    assert manifest["num_classes"] == 10
    counts = {split: info["count"] for split, info in manifest["splits"].items()}
    assert counts["train"] + counts["val"] == 300
    assert counts["test"] == 100
    assert result["counts"] == counts
    for info in manifest["splits"].values():
        assert info["files"], "every split has at least one shard"
        for name in info["files"]:
            assert name.endswith(".tfrecord") and (out / name).is_file()
    assert partial_leftovers(data_root) == []


def test_raw_and_gzipped_files_with_same_content_share_a_digest(tmp_path, prepare) -> None:
    gzipped = prepare(idxdata.write_dataset(tmp_path / "gz", gz=True))
    raw = prepare(idxdata.write_dataset(tmp_path / "raw", gz=False))
    assert raw["digest"] == gzipped["digest"]
    assert raw["cached"] is True


def test_every_class_keeps_training_examples_however_large_the_validation_fraction(tmp_path, prepare) -> None:
    # Two examples per class: a 0.9 fraction would hold out both; one stays to train on.
    source = idxdata.write_dataset(tmp_path / "source", train=20, test=10)
    result = prepare(source, val_fraction=0.9)
    manifest = data.load_manifest(result["manifest"])
    assert manifest["splits"]["train"]["class_histogram"] == [1] * 10
    assert manifest["splits"]["val"]["class_histogram"] == [1] * 10
    # Another split than the one rule 1 made (every example held out): not the digest a cache of it has.
    assert manifest["settings"]["split_rule"] == 2
    assert "split_rule" not in data.load_manifest(prepare(source, val_fraction=0.1)["manifest"])["settings"]


def test_a_class_with_a_single_training_example_is_refused_by_name(tmp_path, data_root, prepare) -> None:
    # 11 examples of 10 classes: class 0 has two, classes 1..9 one each (they would train on nothing).
    with pytest.raises(StepError, match=r"class 1 \('1'\), 2 \('2'\).* single training example.* at least 2"):
        prepare(idxdata.write_dataset(tmp_path / "source", train=11, test=10))
    assert not (data_root / "datasets").exists() or partial_leftovers(data_root) == []


def test_validation_split_holds_every_class(source_dir, prepare) -> None:
    manifest = data.load_manifest(prepare(source_dir)["manifest"])
    val_histogram = manifest["splits"]["val"]["class_histogram"]
    assert all(count >= 1 for count in val_histogram), val_histogram
    # 30 examples per class, 10% held out of each.
    assert val_histogram == [3] * 10
    _, labels = data.arrays(manifest, "val")
    assert sorted(set(labels.tolist())) == list(range(10))


def test_train_and_validation_records_partition_the_training_file(source_dir, prepare) -> None:
    manifest = data.load_manifest(prepare(source_dir)["manifest"])
    train_images, _ = data.arrays(manifest, "train")
    val_images, _ = data.arrays(manifest, "val")
    seen = [img.tobytes() for img in np.concatenate([train_images, val_images])]
    assert len(set(seen)) == 300


def test_rerun_returns_cached_manifest_without_rewriting(source_dir, data_root, prepare) -> None:
    first = prepare(source_dir)
    before = _tree(data_root / "datasets")
    second = prepare(source_dir)
    assert second["cached"] is True
    assert second["manifest"] == first["manifest"]
    assert second["digest"] == first["digest"]
    assert second["counts"] == first["counts"] == {"train": 270, "val": 30, "test": 100}
    assert _tree(data_root / "datasets") == before


def _truncate_first_test_shard(manifest: dict) -> Path:
    shard = Path(data.split_files(manifest, "test")[0])
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard


def _overwrite_bytes_in_a_train_shard(manifest: dict) -> Path:
    """Same size, other content: a disk error or another dataset's shard copied over it."""
    shard = Path(data.split_files(manifest, "train")[0])
    content = bytearray(shard.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 16] = bytes(255 - b for b in content[middle:middle + 16])
    shard.write_bytes(bytes(content))
    return shard


def _unreadable_manifest(manifest: dict) -> Path:
    path = Path(manifest["root"]) / "manifest.json"
    path.write_text(path.read_text()[:300])
    return path


def _missing_val_shard(manifest: dict) -> Path:
    shard = Path(data.split_files(manifest, "val")[0])
    shard.unlink()
    return shard


@pytest.mark.parametrize(("damage", "words"), [
    (_truncate_first_test_shard, "bytes where prep wrote"),
    (_overwrite_bytes_in_a_train_shard, "content differs from what prep wrote"),
    (_unreadable_manifest, "unreadable manifest"),
    (_missing_val_shard, "a shard of the val split is missing"),
], ids=["truncated-shard", "shard-overwritten", "unreadable-manifest", "missing-shard"])
def test_a_damaged_prepared_dataset_is_named_by_the_steps_and_prepared_again_by_prep(
        source_dir, data_root, prepare, damage, words) -> None:
    """A disk error or a copy cut short after prep finished: the other steps refuse it naming the file and
    saying "run prep again", and prep then prepares it again instead of returning it from its cache."""
    first = prepare(source_dir)
    named = damage(data.load_manifest(first["manifest"]))
    with pytest.raises(StepError, match=words) as refused:
        data.load_manifest(first["manifest"])
    assert str(named) in str(refused.value) and "run prep again" in str(refused.value)

    again = prepare(source_dir)
    assert again["cached"] is False and again["manifest"] == first["manifest"]
    manifest = data.load_manifest(again["manifest"])
    assert sum(1 for _ in data.examples(manifest, "test")) == 100
    assert prepare(source_dir)["cached"] is True


def test_a_file_that_is_not_a_manifest_is_refused_naming_the_flag(tmp_path, source_dir, prepare) -> None:
    """e.g. train's result.json passed as --manifest: not a KeyError deep inside a step."""
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / core.COMPLETE_MARKER).write_text("ok\n")
    (folder / "result.json").write_text(json.dumps({"model_path": "model.keras", "metrics": {}}))
    with pytest.raises(StepError, match=r"not a manifest written by prep \(no digest, image_shape, num_classes, "
                                        r"splits\); pass --manifest"):
        data.load_manifest(folder / "result.json")


def test_different_split_settings_get_a_different_folder(source_dir, prepare) -> None:
    first = prepare(source_dir)
    other = prepare(source_dir, val_fraction=0.2)
    assert other["cached"] is False
    assert other["manifest"] != first["manifest"]
    assert other["counts"]["val"] == 60


def test_records_per_shard_splits_output_into_numbered_shards(source_dir, prepare) -> None:
    manifest = data.load_manifest(prepare(source_dir, records_per_shard=40)["manifest"])
    assert manifest["splits"]["test"]["files"] == [f"test-{i:05d}-of-00003.tfrecord" for i in range(3)]
    images, labels = data.arrays(manifest, "test")
    assert len(images) == len(labels) == 100


def test_a_custom_dataset_has_as_many_classes_as_its_labels_say_and_validates(tmp_path, data_root, prepare) -> None:
    from mlsteps import validate

    result = prepare(idxdata.write_dataset(tmp_path / "three", classes=3))  # labels 0, 1, 2; no --num-classes
    manifest = data.load_manifest(result["manifest"])
    assert (manifest["num_classes"], manifest["class_names"]) == (3, ["0", "1", "2"])
    report = validate.inspect(manifest, validate.ValidateConfig(manifest=result["manifest"], data_root=str(data_root),
                                                                run_key="three"))
    assert report["passed"], validate.summary(report)


def test_an_empty_split_is_refused_naming_the_file(source_dir, data_root, prepare) -> None:
    path = _rewrite(source_dir, "train_images", idxdata.idx_bytes((0, 28, 28), b""))
    _rewrite(source_dir, "train_labels", idxdata.idx_bytes((0,), b""))
    with pytest.raises(IdxFormatError, match="holds no images") as caught:
        prepare(source_dir)
    assert str(path) in str(caught.value) and datasets_entries(data_root) == []


def test_a_mirror_that_is_not_a_url_is_refused_before_anything_is_fetched(data_root, prepare) -> None:
    with pytest.raises(StepError, match="'ossci-datasets.s3.amazonaws.com/mnist/' is not an http"):
        prepare(None, dataset="mnist", mirrors=("ossci-datasets.s3.amazonaws.com/mnist/",))


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_split_seed_numpy_cannot_take_is_refused_before_anything_is_read(source_dir, data_root, prepare,
                                                                          seed) -> None:
    with pytest.raises(StepError, match=f"--seed must be a whole number from 0 to 4294967295, got {seed}"):
        prepare(source_dir, seed=seed)
    assert datasets_entries(data_root) == []


def test_num_classes_change_is_not_served_from_cache(source_dir, prepare) -> None:
    prepare(source_dir, num_classes=10)
    again = prepare(source_dir, num_classes=12)
    manifest = json.loads(Path(again["manifest"]).read_text())
    assert manifest["num_classes"] == 12


# Malformed inputs. Each case turns a good synthetic folder into a bad one and says which file to blame.

def _rewrite(folder: Path, role: str, payload: bytes) -> Path:
    path = folder / idxdata.NAMES[role]
    path.write_bytes(gzip.compress(payload, mtime=0))
    return path


def _payload(folder: Path, role: str) -> bytes:
    return gzip.decompress((folder / idxdata.NAMES[role]).read_bytes())


def _wrong_magic(folder: Path) -> tuple[Path, str]:
    payload = _payload(folder, "train_images")
    return _rewrite(folder, "train_images", b"\x00\x00\x08\x01" + payload[4:]), "wrong magic"


def _truncated_images(folder: Path) -> tuple[Path, str]:
    return _rewrite(folder, "test_images", _payload(folder, "test_images")[:-100]), "truncated"


def _label_count_mismatch(folder: Path) -> tuple[Path, str]:
    labels = _payload(folder, "train_labels")[8:]
    path = _rewrite(folder, "train_labels", idxdata.idx_bytes((299,), labels[:299]))
    return path, "300 images but 299 labels"


def _label_out_of_range(folder: Path) -> tuple[Path, str]:
    labels = bytearray(_payload(folder, "test_labels")[8:])
    labels[7] = 12
    path = _rewrite(folder, "test_labels", idxdata.idx_bytes((len(labels),), bytes(labels)))
    return path, "label 12 at index 7 is out of range 0..9; give --num-classes 13 or more"


def _corrupt_gzip(folder: Path) -> tuple[Path, str]:
    path = folder / idxdata.NAMES["train_labels"]
    path.write_bytes(path.read_bytes()[:-20])
    return path, "gzip stream is corrupt"


@pytest.mark.parametrize(
    "break_folder",
    [_wrong_magic, _truncated_images, _label_count_mismatch, _label_out_of_range, _corrupt_gzip],
    ids=["wrong-magic", "truncated-image-file", "labels-count-differs", "label-out-of-range", "corrupt-gzip"],
)
def test_malformed_file_is_named_and_leaves_no_output(source_dir, data_root, prepare, break_folder) -> None:
    bad_file, expected = break_folder(source_dir)
    with pytest.raises(IdxFormatError, match=expected) as caught:
        prepare(source_dir, num_classes=10)
    assert str(bad_file) in str(caught.value)
    assert datasets_entries(data_root) == []
    assert partial_leftovers(data_root) == []


def test_swapped_images_and_labels_files_are_named_as_swapped(source_dir, data_root, prepare) -> None:
    images, labels = _payload(source_dir, "train_images"), _payload(source_dir, "train_labels")
    path = _rewrite(source_dir, "train_images", labels)
    _rewrite(source_dir, "train_labels", images)
    with pytest.raises(IdxFormatError, match="this is an IDX labels file; are the images and labels files "
                                             "swapped") as caught:
        prepare(source_dir)
    assert str(path) in str(caught.value) and datasets_entries(data_root) == []


def _shift_labels(folder: Path, by: int) -> Path:
    for role in ("train_labels", "test_labels"):
        path = _rewrite(folder, role, _payload(folder, role)[:8] + bytes(v + by for v in _payload(folder, role)[8:]))
    return folder / idxdata.NAMES["train_labels"]


def test_labels_numbered_from_one_are_refused_with_the_renumbering_not_an_untrainable_class(
        source_dir, data_root, prepare) -> None:
    """Counted from the labels (the DAG's way), 1..10 made 11 classes, class 0 empty: validate then refused the
    prepared dataset on every try ("smallest class 0 holds 0.00%"), and nothing said to renumber."""
    path = _shift_labels(source_dir, 1)
    with pytest.raises(IdxFormatError) as caught:
        prepare(source_dir)
    message = str(caught.value)
    assert message.startswith(f"{path}: no training example has label 0, so these labels do not make 11 classes")
    assert "number the classes 0..K-1 without gaps; if the labels start at 1, number them from 0 instead " \
           "(subtract 1)" in message
    assert datasets_entries(data_root) == []
    with pytest.raises(IdxFormatError, match=r"give --num-classes 11 or more, or 0 to count them from the labels; "
                                             r"if the labels start at 1, number them from 0 instead \(subtract 1\)"):
        prepare(source_dir, num_classes=10)


def test_a_label_no_training_example_has_is_named(source_dir, prepare) -> None:
    labels = bytearray(_payload(source_dir, "train_labels"))
    labels[8:] = bytes(4 if v == 5 else v for v in labels[8:])  # class 5 only in the test split
    _rewrite(source_dir, "train_labels", bytes(labels))
    with pytest.raises(IdxFormatError, match="no training example has label 5, so these labels do not make 10 "
                                             "classes 0..9: number the classes 0..K-1 without gaps$"):
        prepare(source_dir)
    assert prepare(source_dir, num_classes=10)["manifest"]  # as given: the user's choice (validate judges it)


def test_splits_of_different_image_sizes_are_refused_naming_both_files(tmp_path, data_root, prepare) -> None:
    small, large = idxdata.write_dataset(tmp_path / "small", size=28), idxdata.write_dataset(tmp_path / "l", size=32)
    for role in ("test_images", "test_labels"):
        (small / idxdata.NAMES[role]).write_bytes((large / idxdata.NAMES[role]).read_bytes())
    with pytest.raises(IdxFormatError) as caught:
        prepare(small)
    assert str(caught.value) == (
        f"train images are (28, 28) ({small / idxdata.NAMES['train_images']}) but test images are (32, 32) "
        f"({small / idxdata.NAMES['test_images']}): both splits need one image size (resize one of them)")


def test_a_header_whose_dimensions_overflow_64_bits_is_a_format_error() -> None:
    payload = idxdata.idx_bytes((2**31, 2**31, 4), bytes(16))
    with pytest.raises(IdxFormatError, match="file truncated"):
        idx.parse(Path("x.idx"), payload, expect_ndim=3)


def test_checksum_mismatch_names_file_and_leaves_no_output(source_dir, data_root, prepare) -> None:
    with pytest.raises(prep.DatasetChecksumError) as caught:
        prepare(source_dir, dataset="fashion_mnist")
    message = str(caught.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert "SHA-256" in message
    assert datasets.FASHION_MNIST.file("train_images").sha256[0] in message
    # The user's own folder: never "delete it"; their files are prepared as dataset custom.
    assert "Delete it" not in message and "DATASET=custom" in message and "--verify-checksums false" in message
    assert datasets_entries(data_root) == []
    assert partial_leftovers(data_root) == []


def test_a_corrupt_file_in_the_download_cache_is_named_for_deletion(tmp_path, data_root, prepare) -> None:
    cache = data_root / "cache" / "mnist"
    cache.mkdir(parents=True)
    for path in idxdata.write_dataset(tmp_path / "source").iterdir():
        (cache / path.name).write_bytes(path.read_bytes())  # "downloaded" once, not MNIST's content
    with pytest.raises(prep.DatasetChecksumError, match="Delete it and run prep again") as caught:
        prepare(None, dataset="mnist")
    assert str(cache / "train-images-idx3-ubyte.gz") in str(caught.value)


@pytest.mark.skipif(not Path(datasets.FASHION_MNIST.system_dirs[0]).is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_files_given_as_mnist_are_recognised_and_the_right_dataset_named(prepare) -> None:
    with pytest.raises(prep.DatasetChecksumError,
                       match="this is the fashion_mnist train-images-idx3-ubyte.gz, not mnist's: .*DATASET=fashion_mnist"):
        prepare(Path(datasets.FASHION_MNIST.system_dirs[0]), dataset="mnist")


def _known_as_fashion(monkeypatch, folder: Path, *, content: bool) -> None:
    """Make the files in ``folder`` stand in for Fashion-MNIST's: their archives' digests unknown (another
    gzip, as Debian's package has), their decompressed content's digest known if ``content``."""
    import dataclasses

    spec = datasets.KNOWN["fashion_mnist"]
    files = tuple(dataclasses.replace(f, sha256=("0" * 64,), content_sha256=hashlib.sha256(
        _payload(folder, f.role)).hexdigest() if content else None) for f in spec.files)
    monkeypatch.setitem(datasets.KNOWN, "fashion_mnist", dataclasses.replace(spec, files=files, system_dirs=()))


def test_a_recompressed_copy_passes_by_its_content_digest_and_a_changed_one_does_not(
        source_dir, data_root, prepare, monkeypatch) -> None:
    _known_as_fashion(monkeypatch, source_dir, content=True)
    assert prepare(source_dir, dataset="fashion_mnist")["manifest"]  # the offline `make demo` path
    labels = bytearray(_payload(source_dir, "test_labels"))
    labels[-1] = (labels[-1] + 1) % 10  # one label changed: same format, other content
    bad = _rewrite(source_dir, "test_labels", bytes(labels))
    with pytest.raises(prep.DatasetChecksumError, match="does not match the known fashion_mnist") as caught:
        prepare(source_dir, dataset="fashion_mnist")
    assert str(bad) in str(caught.value)


def test_an_uncompressed_copy_with_only_the_archive_digest_known_cannot_be_verified(
        tmp_path, data_root, prepare, monkeypatch) -> None:
    gz = idxdata.write_dataset(tmp_path / "gz")
    _known_as_fashion(monkeypatch, gz, content=False)
    raw = idxdata.write_dataset(tmp_path / "raw", gz=False)
    with pytest.raises(prep.DatasetChecksumError, match="uncompressed, and only the official .* cannot be verified"):
        prepare(raw, dataset="fashion_mnist")
    assert datasets_entries(data_root) == []


def test_checksums_can_be_skipped_for_known_dataset_names(source_dir, prepare) -> None:
    result = prepare(source_dir, dataset="fashion_mnist", verify_checksums=False)
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["class_names"][0] == "T-shirt/top"
    assert manifest["expected_counts"] == [60000, 10000]


@pytest.mark.parametrize("role", list(idxdata.NAMES), ids=list(idxdata.NAMES))
def test_missing_file_in_source_dir_is_named(source_dir, data_root, prepare, role) -> None:
    (source_dir / idxdata.NAMES[role]).unlink()
    with pytest.raises(StepError, match="missing") as caught:
        prepare(source_dir)
    assert idxdata.NAMES[role] in str(caught.value)
    assert str(source_dir) in str(caught.value)
    assert datasets_entries(data_root) == []


def test_a_source_dir_that_does_not_exist_is_named_as_such(tmp_path, data_root, prepare) -> None:
    with pytest.raises(StepError, match="no such folder") as caught:
        prepare(tmp_path / "typo")
    assert str(tmp_path / "typo") in str(caught.value)
    assert datasets_entries(data_root) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"source_dir": None}, "needs --source-dir"),
        ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
        ({"val_fraction": 0.0}, "--val-fraction"),
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"records_per_shard": 0}, "--records-per-shard must be at least 1, got 0"),
        ({"records_per_shard": -5}, "--records-per-shard must be at least 1, got -5"),
        # One class would make a classifier that always answers it; -1 is no count at all.
        ({"num_classes": 1}, r"--num-classes must be 0 \(count them from the labels\) or at least 2, got 1"),
        ({"num_classes": -1}, r"--num-classes must be 0 .* or at least 2, got -1"),
        ({"mirrors": ["ftp://example.org/mnist/"]}, "--mirrors: 'ftp://example.org/mnist/' is not an http"),
        ({"download_timeout": 0.0}, "--download-timeout must be a number of seconds > 0, got 0"),
        ({"download_timeout": -1.0}, "--download-timeout must be a number of seconds > 0, got -1"),
    ],
    ids=["custom-without-source", "unknown-dataset", "val-fraction-zero", "val-fraction-one",
         "records-per-shard-zero", "records-per-shard-negative", "one-class", "negative-classes", "ftp-mirror",
         "download-timeout-zero", "download-timeout-negative"],
)
def test_bad_settings_fail_before_any_work(source_dir, data_root, prepare, overrides, message) -> None:
    with pytest.raises(StepError, match=message):
        prepare(source_dir, **overrides)
    assert list(data_root.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(not Path(datasets.FASHION_MNIST.system_dirs[0]).is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_installed_fashion_mnist_passes_checksums_and_has_official_sizes(data_root, prepare) -> None:
    result = prepare(None, dataset="fashion_mnist")
    assert result["counts"]["train"] + result["counts"]["val"] == 60000
    assert result["counts"]["test"] == 10000
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["sources"]["train_images"]["path"].startswith(datasets.FASHION_MNIST.system_dirs[0])
    assert not (data_root / "cache" / "fashion_mnist").exists() or not any(
        (data_root / "cache" / "fashion_mnist").iterdir())


@pytest.mark.parametrize(("env", "threads"), [("3", 3), ("", None)], ids=["pod-limit", "unset"])
def test_the_input_pipeline_takes_as_many_threads_as_the_pod_gives_tensorflow(source_dir, prepare, monkeypatch,
                                                                               env, threads) -> None:
    """mlops_airflow.pods sets TF_NUM_INTRAOP_THREADS to the pod's CPUs; tf.data's own pool must follow it
    (unset: tf.data's default, a thread per core)."""
    manifest = data.load_manifest(prepare(source_dir)["manifest"])
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", env)
    batches = data.dataset(manifest, "train", batch_size=32, shuffle=True)

    assert batches.options().threading.private_threadpool_size == threads
    assert sum(int(y.shape[0]) for _, y in batches) == manifest["splits"]["train"]["count"]
