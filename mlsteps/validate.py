"""validate: check a prepared dataset before any training, and report what is wrong in plain words.

Checks label range, image shape and dtype, counts against the manifest (and the official sizes),
class balance, exact-duplicate leakage from train into val and test, and pixel statistics. The report is
written as JSON into the run's folder and logged to MLflow, whether the data passes or not.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import data, model, tracking
from .core import StepError, cli, field, write_json_atomic

log = logging.getLogger("mlsteps.validate")


class DataValidationError(StepError):
    """The dataset failed one or more checks; the message lists them."""


@dataclass(frozen=True, kw_only=True)
class ValidateConfig(tracking.RunStepConfig):
    min_class_share: float = field(0.5, help="each class must hold at least this multiple of a uniform share (1/classes)")
    max_leakage: float = field(0.01, help="largest allowed share of test (or validation) images that exactly "
                                          "duplicate a training image")
    max_blank_share: float = field(0.01, help="largest allowed share of constant (blank) images per split")
    max_mean_shift: float = field(10.0, help="largest allowed difference of mean pixel value (0..255) between train and test")


def _check(checks: list[dict[str, Any]], name: str, passed: bool, detail: str, **values: Any) -> None:
    checks.append({"name": name, "passed": bool(passed), "detail": detail, **values})


def _digests(images: np.ndarray) -> list[bytes]:
    """One content hash per image, for exact-duplicate detection."""
    return [hashlib.blake2b(img.tobytes(), digest_size=16).digest() for img in images]


def inspect(manifest: dict[str, Any], config: ValidateConfig) -> dict[str, Any]:
    """Run every check; return the report (never raises for bad data)."""
    checks: list[dict[str, Any]] = []
    stats: dict[str, Any] = {}
    num_classes = manifest["num_classes"]
    height, width = manifest["image_shape"]
    too_small = model.size_error((height, width))
    _check(checks, "image size fits the model", not too_small,
           too_small or f"{height}x{width}: at least {model.MIN_IMAGE_SIDE} pixels on each side",
           value=min(height, width), threshold=model.MIN_IMAGE_SIDE)
    loaded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, info in manifest["splits"].items():
        # Each record's image is raw bytes: it decodes as HxW uint8 exactly when it holds H*W bytes (the
        # reshape fails otherwise), so this one check is the shape and dtype check.
        decodes = f"{split}: images decode as {height}x{width} uint8"
        try:
            images, labels = data.arrays(manifest, split, check_count=False)
        except Exception as exc:  # a TF decode/reshape error means the records are not HxW uint8 images
            _check(checks, decodes, False,
                   f"records in {', '.join(info['files'])} do not decode: {str(exc).splitlines()[0]}")
            continue
        loaded[split] = (images, labels)
        _check(checks, decodes, True, f"{len(images)} images of {height}x{width} uint8")
        _check(checks, f"{split}: count matches manifest", len(images) == info["count"],
               f"read {len(images)} examples, manifest says {info['count']}", value=len(images), expected=info["count"])
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        _check(checks, f"{split}: labels in 0..{num_classes - 1}", bad.size == 0,
               f"{bad.size} labels out of range" + (f", first at index {bad[0]}: {labels[bad[0]]}" if bad.size else ""),
               value=int(bad.size))
        if bad.size:
            continue
        counts = np.bincount(labels, minlength=num_classes)
        shares = counts / max(1, len(labels))
        floor = config.min_class_share / num_classes
        weakest = int(np.argmin(shares))
        # Below the floor by more than chance explains: a split drawn at random (a custom dataset's test images)
        # holds a class at the floor's share with a count that varies by sqrt(n p (1 - p)); three standard
        # deviations under it fail (a 50-image test split of 10 classes failed 3 times in 4 on the share alone).
        n = len(labels)
        allowed = max(0.0, floor * n - 3 * math.sqrt(n * floor * (1 - floor)))
        _check(checks, f"{split}: class balance", counts.min() >= allowed,
               f"smallest class {weakest} ({manifest['class_names'][weakest]}) holds {shares.min():.2%} "
               f"({counts.min()} of {n}), floor is {floor:.2%} (fewer than {allowed:.0f} images is more than "
               "chance; --min-class-share sets the floor)", value=float(shares.min()), threshold=floor,
               allowed_count=round(allowed, 1))
        blank = float(np.mean(np.ptp(images.reshape(len(images), -1), axis=1) == 0)) if len(images) else 0.0
        _check(checks, f"{split}: blank images", blank <= config.max_blank_share,
               f"{blank:.2%} of images are constant, allowed {config.max_blank_share:.2%}",
               value=blank, threshold=config.max_blank_share)
        stats[split] = {"count": len(images), "pixel_mean": float(images.mean()) if len(images) else 0.0,
                        "pixel_std": float(images.std()) if len(images) else 0.0,
                        "class_shares": [round(float(s), 5) for s in shares]}
    expected = manifest.get("expected_counts")
    if expected and {"train", "val", "test"} <= stats.keys():
        got = (stats["train"]["count"] + stats["val"]["count"], stats["test"]["count"])
        _check(checks, "official dataset sizes", got == tuple(expected),
               f"train+val={got[0]}, test={got[1]}; the official {manifest['dataset']} has {expected[0]}/{expected[1]}")
    hashes = {split: _digests(images) for split, (images, _) in loaded.items()}  # each split's once
    if "train" in loaded and "val" in loaded:
        # Exact duplicates within the user's training images can land on both sides of prep's split: the
        # validation split then scores memorised images, and the search's choice and compress's gate with it.
        in_train = set(hashes["train"])
        doubled = sum(h in in_train for h in hashes["val"])
        share = doubled / max(1, len(hashes["val"]))
        _check(checks, "train/val leakage (exact duplicates)", share <= config.max_leakage,
               f"{doubled} validation images ({share:.2%}) also appear in the train split, allowed "
               f"{config.max_leakage:.2%}: remove the duplicates from the training images", value=share,
               threshold=config.max_leakage, count=doubled)
    if "train" in loaded and "test" in loaded:
        train_hashes = set(hashes["train"]) | set(hashes.get("val", []))
        leaked = sum(h in train_hashes for h in hashes["test"])
        share = leaked / max(1, len(hashes["test"]))
        _check(checks, "train/test leakage (exact duplicates)", share <= config.max_leakage,
               f"{leaked} test images ({share:.2%}) also appear in the training data, allowed {config.max_leakage:.2%}",
               value=share, threshold=config.max_leakage, count=leaked)
        if "train" in stats and "test" in stats:
            shift = abs(stats["train"]["pixel_mean"] - stats["test"]["pixel_mean"])
            _check(checks, "pixel mean shift train vs test", shift <= config.max_mean_shift,
                   f"mean pixel differs by {shift:.2f} (train {stats['train']['pixel_mean']:.2f}, "
                   f"test {stats['test']['pixel_mean']:.2f}), allowed {config.max_mean_shift}",
                   value=shift, threshold=config.max_mean_shift)
    failed = [c for c in checks if not c["passed"]]
    return {"dataset": manifest["dataset"], "digest": manifest["digest"], "passed": not failed,
            "failed": [c["name"] for c in failed], "checks": checks, "stats": stats,
            "thresholds": {k: v for k, v in asdict(config).items() if k.startswith(("min_", "max_"))}}


def summary(report: dict[str, Any]) -> str:
    lines = [f"dataset {report['dataset']} ({report['digest'][:16]}): "
             f"{'passed' if report['passed'] else 'FAILED'} {len(report['checks'])} checks"]
    lines += [f"  {'ok  ' if c['passed'] else 'FAIL'} {c['name']}: {c['detail']}" for c in report["checks"]]
    return "\n".join(lines)


def run(config: ValidateConfig) -> dict[str, Any]:
    manifest = data.load_manifest(config.manifest)
    report = inspect(manifest, config)
    report_path = tracking.run_dir(config.data_root, config.run_key) / "validation.json"
    write_json_atomic(report_path, report)
    mlflow = tracking.connect(config.tracking_uri)
    run_id = tracking.run_for(mlflow, config.run_key, experiment=config.experiment)
    client = mlflow.MlflowClient()
    client.log_dict(run_id, report, "validation/report.json")
    client.set_tag(run_id, "data.validation", "passed" if report["passed"] else "failed")
    log.info("%s", summary(report))
    if report["passed"]:
        # Params name the data this run trains on, so only data that passed: after a failure the user fixes
        # the data and clears the task, and MLflow params never change. The report names the failed data.
        # (Data changed after it passed, under the same run key: the new digest goes to data.dataset_changed.)
        tracking.log_params_once(mlflow, run_id, {"dataset": manifest["dataset"],
                                                  "dataset_digest": manifest["digest"]}, "data.dataset_changed")
        if client.get_run(run_id).info.status == "FAILED":
            # a retry after the data was fixed: the pipeline goes on (a run that finished stays finished: only
            # validate cleared, nothing after it would end the run again)
            client.update_run(run_id, status="RUNNING")
    else:
        # Not left RUNNING for good: the pipeline run stops here (a retry after fixing the data reopens it).
        try:
            client.set_terminated(run_id, "FAILED")
        except Exception as unreachable:  # noqa: BLE001 - the validation failure is the one to report
            log.warning("could not mark MLflow run %s failed: %s", run_id, unreachable)
        raise DataValidationError(f"data validation failed ({', '.join(report['failed'])}); "
                                  f"full report: {report_path}\n{summary(report)}")
    return {"passed": True, "report": str(report_path), "mlflow_run_id": run_id,
            "manifest": config.manifest, "digest": manifest["digest"]}


def main(argv: list[str] | None = None) -> int:
    return cli(run, ValidateConfig, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    raise SystemExit(main())
