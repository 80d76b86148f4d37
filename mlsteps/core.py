"""What every step shares: typed configs that become CLIs, result files, atomic outputs, logging."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import glob
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

# KubernetesPodOperator's XCom sidecar reads exactly this file.
DEFAULT_RESULT_PATH = "/airflow/xcom/return.json"
RESULT_PATH_ENV = "MLSTEPS_RESULT_PATH"

log = logging.getLogger("mlsteps")


class StepError(Exception):
    """A failure the user can act on; the CLI prints it without a stack trace and exits 2."""


class NodeError(Exception):
    """A fault of the machine the step ran on (e.g. a GPU it cannot use) or of a service it needs (a database,
    MLflow) not answering; the CLI prints it without a stack trace and exits 1, so the runner retries, perhaps
    on another node."""


C = TypeVar("C")


def field(default: Any = dataclasses.MISSING, *, help: str, **kwargs: Any) -> Any:
    """A config field with a one-line meaning that doubles as its ``--help`` text."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _cli_type(annotation: Any) -> tuple[Callable[[str], Any], bool]:
    """Return (parser, optional) for a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return _cli_type(inner)[0], True
    if annotation is bool:
        return _parse_bool, False
    if annotation is int:
        return _parse_int, False
    if annotation is float:
        return _parse_float, False
    if annotation is str:
        return str, False
    if origin is tuple:
        item = _cli_type(args[0])[0]
        return (lambda s: tuple(item(x.strip()) for x in s.split(",") if x.strip())), False
    raise TypeError(f"unsupported config field type {annotation!r}")


def _parse_int(text: str) -> int:
    """A whole number; "5.0" or "1e4" too (a JSON client's 5.0 reaches the steps through a rendered template)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number.is_integer()):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(number)


def _parse_float(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if math.isnan(number):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return number


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_config(config_cls: type[C], argv: Sequence[str] | None, description: str) -> tuple[C, Path]:
    """Build an argparse CLI from a frozen config dataclass; return the config and the result path."""
    hints = typing.get_type_hints(config_cls)
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(config_cls):
        convert, optional = _cli_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())

        def parse(text: str, convert: Callable[[str], Any] = convert, optional: bool = optional) -> Any:
            if optional and text in ("", "None", "none"):
                return None
            return convert(text)

        parser.add_argument(flag, dest=f.name, type=parse, required=required, default=default,
                            help=f.metadata.get("help", "") + ("" if required else f" (default: {default})"))
    parser.add_argument("--result-path", default=os.environ.get(RESULT_PATH_ENV, DEFAULT_RESULT_PATH),
                        help=f"where the result JSON is written (env {RESULT_PATH_ENV}; default: %(default)s)")
    ns = vars(parser.parse_args(_joined(sys.argv[1:] if argv is None else list(argv), parser)))
    result_path = Path(ns.pop("result_path"))
    return config_cls(**ns), result_path


def _joined(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--flag value`` as ``--flag=value`` for every flag (each takes a value): a value that starts with "-"
    (a reviewer's comment "-1, worse on shirts", a rendered template) would otherwise be taken for a flag."""
    flags = {option for action in parser._actions for option in action.option_strings if action.nargs != 0}
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in flags and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("MLSTEPS_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout, force=True)


EXPECTED_GPUS_ENV = "MLSTEPS_EXPECTED_GPUS"  # set by the Kubernetes runtime on pods that request GPUs


def require_gpus(tf: Any, *, param: str = "gpus") -> int:
    """The GPUs TensorFlow sees; a NodeError when the pod was given more than that.

    A pod granted a GPU whose image lacks TensorFlow's CUDA build (or whose node lacks a working driver)
    would otherwise train on the CPU for hours while holding the GPU. ``param`` is the trigger-form field
    that gave the pod its GPUs (the error names it).
    """
    visible = len(tf.config.list_physical_devices("GPU"))
    text = os.environ.get(EXPECTED_GPUS_ENV, "0").strip() or "0"
    expected = int(text) if text.isdigit() else 0
    if visible < expected:  # retried: another node may have a working driver (a missing CUDA build fails again)
        raise NodeError(f"this pod was given {expected} GPU(s) but TensorFlow sees {visible}: build the steps image "
                        "with --build-arg TF_EXTRAS=and-cuda (TensorFlow's CUDA libraries), and check the node's "
                        f"NVIDIA driver and device plugin; or set {param} to 0 in the trigger form to train on CPUs")
    return visible


SEED_MAX = 2**32 - 1  # the largest seed Keras (and NumPy's legacy generator) takes


def seed_error(seed: int) -> str | None:
    """Why ``seed`` cannot seed NumPy and Keras, or None."""
    if 0 <= seed <= SEED_MAX:
        return None
    return f"--seed must be a whole number from 0 to {SEED_MAX}, got {seed}"


# What fsync on a folder raises where the filesystem cannot flush one (CIFS before Linux 4.17, some FUSE and
# CSI drivers): the rename is then as durable as that filesystem makes it, and the step goes on.
_NO_DIRECTORY_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _fsync(path: str | Path, *, directory: bool = False) -> None:
    """Flush a file's content, or a folder's entries (a rename, a new file: a file's fsync does not cover its
    name), to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (directory and exc.errno in _NO_DIRECTORY_FSYNC):
            raise
        log.debug("%s: this filesystem cannot fsync a folder (%s)", path, exc.strerror)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one, after a crash too.

    The content reaches the disk before the rename does: otherwise a node that loses power just after can
    come back with the new name on an empty file (ext4's and XFS's delayed allocation).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o644)  # as a plain open() would create it (mkstemp's file is 0600)
            json.dump(payload, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, directory=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (and ``root``) to the disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder, directory=True)


COMPLETE_MARKER = "_COMPLETE"
ABANDONED_AFTER_S = 24 * 3600  # a scratch folder this old was left by a killed writer (no step runs over 12 h)


@contextmanager
def atomic_directory(final: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``final`` (with a completion marker) only if the block succeeds.

    A complete ``final`` already there is kept as it is (a concurrent writer of the same result finished
    first) or, with ``replace`` (a result for other settings), swapped out only once the new one is whole.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(final)
    scratch = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    try:
        # mkdtemp's folder is its owner's alone (0700): published so, other users of a shared data root could
        # not read the result (and would take it for missing). As a plain mkdir would make it, keeping the
        # setgid bit it inherited from a group-shared data root:
        scratch.chmod((0o777 & ~_umask()) | (scratch.stat().st_mode & 0o7000))
        yield scratch
        (scratch / COMPLETE_MARKER).write_text("ok\n")
        _fsync_tree(scratch)  # on the disk before the rename publishes it (a crash then finds it whole)
        if final.exists() and not is_complete(final):
            shutil.rmtree(final)  # left by a writer that died before this mechanism existed, or by hand
        if replace and final.exists():
            # Moved aside under a name of its own (another writer may be replacing it too), then put back if
            # the new one cannot take its place (a SIGTERM between the two renames included).
            stale = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".stale"))
            os.rename(final, stale)
            os.utime(stale)  # young: not taken for an abandoned one (the folder keeps its old time)
            try:
                _publish(scratch, final)
            except BaseException:
                if not final.exists():
                    os.rename(stale, final)
                raise
            shutil.rmtree(stale, ignore_errors=True)
        else:
            _publish(scratch, final)
        _fsync(final.parent, directory=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _publish(scratch: Path, final: Path) -> None:
    try:
        os.rename(scratch, final)
    except OSError:
        if not is_complete(final):
            raise
        shutil.rmtree(scratch)  # a concurrent writer finished first


def _remove_abandoned(final: Path) -> None:
    """Scratch folders of ``final`` left by a writer killed outright (SIGKILL, OOM, node loss: no cleanup ran).

    Only those untouched for ABANDONED_AFTER_S, longer than any step runs: a younger one may be a live
    concurrent writer's.
    """
    cutoff = time.time() - ABANDONED_AFTER_S
    for stale in [*final.parent.glob(f".{glob.escape(final.name)}.*.partial"),
                  *final.parent.glob(f".{glob.escape(final.name)}.*.stale")]:
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < cutoff:
                log.warning("removing %s: the scratch folder of a writer killed more than %d h ago", stale,
                            ABANDONED_AFTER_S // 3600)
                shutil.rmtree(stale)


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file()


def safe_name(text: str) -> str:
    """A filesystem-safe rendering of a run key such as ``mnist_training/manual__2026-01-01T00:00:00+00:00``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def write_problem(path: Path) -> str | None:
    """Why a file could not be written (created or replaced) at ``path``, or None."""
    if path.is_dir():
        return "is a folder"
    folder = path.parent
    while not folder.exists():  # the nearest existing folder must let us create the rest
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write in {folder} (permission denied)"
    return None


def _userinfo_password(url: str) -> tuple[int, int] | None:
    """Where the user's password sits in ``url``: from the ``:`` after the user to the last ``@``. Found on the
    text, not by a parse, so that a URL with a typo or an unescaped ``@``, ``/`` or ``?`` in its password (the
    one an error message has to quote) is covered too; a path or query that holds an ``@`` loses more."""
    start = url.find("://") + 3 if "://" in url else 0
    at = url.rfind("@")
    colon = url.find(":", start, at) if at > start else -1
    return (colon + 1, at) if colon >= 0 else None


def without_password(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db (and ``password=***`` in a query), for
    logs and messages."""
    span = _userinfo_password(url)
    if span:
        url = f"{url[:span[0]]}***{url[span[1]:]}"
    base, mark, query = url.partition("?")
    return base + mark + re.sub(r"(?i)((?:^|&)password=)[^&]*", r"\1***", query)


def _passwords(url: str) -> list[str]:
    """What without_password hides in ``url``."""
    span = _userinfo_password(url)
    found = [url[span[0]:span[1]]] if span else []
    rest = url[span[1]:] if span else url
    found += re.findall(r"(?i)(?:[?&])password=([^&]*)", rest)
    return [secret for secret in found if secret]


def hide_passwords(text: str, url: str) -> str:
    """``text`` (a driver's message about ``url``) without the URL's passwords, nor any piece of one of 3 or more
    characters: a driver quotes what it took for the host, the end of a password with an unescaped @, / or ?."""
    for secret in _passwords(url):
        for piece in sorted({secret, *re.split(r"[@/:?]", secret)}, key=len, reverse=True):
            if len(piece) >= 3:
                text = text.replace(piece, "***")
    return text


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    log.warning("terminated (SIGTERM): stopping")
    raise SystemExit(128 + signum)


def cli(run: Callable[[Any], dict[str, Any]], config_cls: type, description: str,
        argv: Sequence[str] | None = None) -> int:
    """Shared ``main``: parse flags into the config, run the step, write its result for XCom."""
    setup_logging()
    config, result_path = parse_config(config_cls, argv, description)
    # SIGTERM (a timed-out or cleared task, a deleted pod) ends the step through its `finally` blocks: a
    # process it started in a session of its own (infra_validate's model server) is stopped, not orphaned.
    # Exit 143 as before; anything not handled in a `finally` is left as a kill would leave it.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if problem := write_problem(result_path):  # found now, not once the work is done
        print(f"error: --result-path {result_path}: {problem}; give a file this step can write (or set "
              f"{RESULT_PATH_ENV}; the default, {DEFAULT_RESULT_PATH}, is a pod's XCom file)", file=sys.stderr,
              flush=True)
        return 2
    try:
        result = run(config)
    except (StepError, NodeError) as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2 if isinstance(exc, StepError) else 1  # 1: the runners retry
    except KeyboardInterrupt:  # Ctrl-C: the `finally` blocks have cleaned up; a traceback would say nothing more
        sys.stdout.flush()
        print("error: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    write_json_atomic(result_path, result)
    log.info("result written to %s", result_path)
    return 0
