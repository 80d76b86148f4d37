"""core: typed configs become CLIs, and outputs appear atomically or not at all."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from stepsupport import disk_events

from mlsteps import core, prep, tracking
from mlsteps.core import StepError, field


@dataclass(frozen=True)
class DemoConfig:
    name: str = field(help="a required string")
    count: int = field(3, help="an int")
    rate: float = field(0.5, help="a float")
    enabled: bool = field(True, help="a bool")
    limit: int | None = field(None, help="an optional int")
    tags: tuple[str, ...] = field(("a",), help="comma-separated strings")
    sizes: tuple[int, ...] | None = field(None, help="optional comma-separated ints")


def _parse(*argv: str) -> tuple[DemoConfig, Path]:
    return core.parse_config(DemoConfig, list(argv), "demo")


def test_defaults_apply_when_only_required_flags_are_given(tmp_path) -> None:
    config, result_path = _parse("--name", "x", "--result-path", str(tmp_path / "r.json"))
    assert config == DemoConfig(name="x")
    assert result_path == tmp_path / "r.json"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--count", "7"], {"count": 7}),
        (["--count", "5.0"], {"count": 5}),
        (["--count", "1e4"], {"count": 10000}),
        (["--rate", "1e-3"], {"rate": 0.001}),
        (["--limit", "10"], {"limit": 10}),
        (["--limit", "none"], {"limit": None}),
        (["--limit", ""], {"limit": None}),
        (["--tags", "x,y,z"], {"tags": ("x", "y", "z")}),
        (["--tags", "x,,y,"], {"tags": ("x", "y")}),
        (["--sizes", "1, 2,3"], {"sizes": (1, 2, 3)}),
        (["--sizes", "None"], {"sizes": None}),
        (["--rate", "-0.5"], {"rate": -0.5}),
        # A reviewer's comment as the runners pass it ("--comment", text): text that looks like a flag is text.
        (["--tags", "-ok"], {"tags": ("-ok",)}),
        (["--tags", "--force"], {"tags": ("--force",)}),
        (["--tags", "--count"], {"tags": ("--count",), "count": 3}),
    ],
    ids=["int", "int-as-whole-float", "int-as-exponent", "float-exponent", "optional-int", "optional-none", "optional-empty", "tuple", "tuple-skips-empty",
         "optional-tuple-of-int", "optional-tuple-none", "negative-float", "value-like-a-short-flag",
         "value-like-a-long-flag", "value-like-another-flag"],
)
def test_typed_fields_parse_from_cli_strings(argv, expected) -> None:
    config, _ = _parse("--name", "x", *argv)
    for key, value in expected.items():
        assert getattr(config, key) == value
        assert type(getattr(config, key)) is type(value)


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("1", True), ("YES", True), ("on", True),
     ("false", False), ("0", False), ("No", False), ("off", False)],
    ids=lambda v: repr(v),
)
def test_bool_flags_accept_common_spellings(text, value) -> None:
    config, _ = _parse("--name", "x", "--enabled", text)
    assert config.enabled is value


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: --name"),
        (["--name", "x", "--enabled", "maybe"], "expected true/false"),
        (["--name", "x", "--count", "many"], "--count: expected a whole number, got 'many'"),
        (["--name", "x", "--count", "2.5"], "--count: expected a whole number, got '2.5'"),
        (["--name", "x", "--rate", "nan"], "--rate: expected a number, got 'nan'"),
        (["--name", "x", "--sizes", "1,two"], "--sizes: expected a whole number, got 'two'"),
        (["--name", "x", "--colour", "red"], "unrecognized arguments"),
    ],
    ids=["missing-required", "bad-bool", "bad-int", "fractional-int", "nan-float", "bad-tuple-item", "unknown-flag"],
)
def test_bad_command_lines_exit_with_argparse_error(capsys, argv, message) -> None:
    with pytest.raises(SystemExit) as caught:
        _parse(*argv)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_tuple_items_are_stripped_of_surrounding_spaces() -> None:
    config, _ = _parse("--name", "x", "--tags", "x, y")
    assert config.tags == ("x", "y")


def test_result_path_defaults_to_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(core.RESULT_PATH_ENV, str(tmp_path / "from-env.json"))
    _, result_path = _parse("--name", "x")
    assert result_path == tmp_path / "from-env.json"


def test_step_configs_build_their_clis() -> None:
    config, _ = core.parse_config(prep.PrepConfig, ["--data-root", "/d", "--mirrors", "http://a/,http://b/",
                                                    "--verify-checksums", "false", "--source-dir", "none"], "prep")
    assert config.mirrors == ("http://a/", "http://b/")
    assert config.verify_checksums is False
    assert config.source_dir is None
    assert config.val_fraction == 0.1


def test_unsupported_field_type_is_rejected_when_building_cli() -> None:
    @dataclass(frozen=True)
    class Bad:
        values: list = field(help="not supported")

    with pytest.raises(TypeError, match="unsupported config field type"):
        core.parse_config(Bad, [], "bad")


def test_atomic_directory_leaves_nothing_when_block_raises(tmp_path) -> None:
    final = tmp_path / "out" / "result"
    with pytest.raises(RuntimeError, match="boom"):
        with core.atomic_directory(final) as scratch:
            (scratch / "half-written").write_text("x")
            raise RuntimeError("boom")
    assert not final.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_atomic_directory_appears_complete_only_after_block(tmp_path) -> None:
    final = tmp_path / "result"
    with core.atomic_directory(final) as scratch:
        (scratch / "data").write_text("x")
        assert not final.exists()
        assert not core.is_complete(scratch)
    assert core.is_complete(final)
    assert (final / "data").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["result"]


def test_atomic_directory_publishes_a_folder_others_can_read_as_a_plain_mkdir_would(tmp_path) -> None:
    """mkdtemp makes its folder 0700: a dataset prepared so looked missing to every other user of a shared
    data root (and their prep tried to delete it)."""
    import os

    mask = os.umask(0o022)
    try:
        with core.atomic_directory(tmp_path / "out") as scratch:
            (scratch / "f").write_text("x")
    finally:
        os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)  # a group-shared data root: new folders inherit the group (setgid), as mkdir's do
    with core.atomic_directory(shared / "out") as scratch:
        pass
    assert (shared / "out").stat().st_mode & 0o2000


def test_atomic_directory_keeps_the_first_complete_writer(tmp_path) -> None:
    final = tmp_path / "result"
    with core.atomic_directory(final) as scratch:
        (scratch / "data").write_text("first")
    with core.atomic_directory(final) as scratch:
        (scratch / "data").write_text("second")
    assert (final / "data").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["result"]


def _finished_result(folder: Path) -> Path:
    """``folder``/model, complete, its result.json saying "old"."""
    from mlsteps import core

    final = folder / "model"
    with core.atomic_directory(final) as scratch:
        (scratch / "result.json").write_text("old")
    return final


def test_atomic_directory_replaces_a_complete_result_only_once_the_new_one_is_whole(tmp_path) -> None:
    from mlsteps import core

    final = _finished_result(tmp_path)
    with pytest.raises(RuntimeError), core.atomic_directory(final, replace=True) as scratch:
        (scratch / "result.json").write_text("new, half")
        raise RuntimeError("training failed")
    assert (final / "result.json").read_text() == "old" and core.is_complete(final)

    with core.atomic_directory(final, replace=True) as scratch:
        (scratch / "result.json").write_text("new")
    assert (final / "result.json").read_text() == "new" and core.is_complete(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no scratch or swapped-out folder left


def test_atomic_directory_puts_the_previous_result_back_when_stopped_between_its_renames(tmp_path,
                                                                                         monkeypatch) -> None:
    """A SIGTERM (SystemExit here) after the old result was moved aside and before the new one took its place."""
    import os

    from mlsteps import core

    final = _finished_result(tmp_path)
    rename = os.rename

    def stopped_before_publishing(source, target):
        if str(source).endswith(".partial"):
            raise SystemExit(143)
        return rename(source, target)

    monkeypatch.setattr(os, "rename", stopped_before_publishing)
    with pytest.raises(SystemExit), core.atomic_directory(final, replace=True) as scratch:
        (scratch / "result.json").write_text("new")
    assert (final / "result.json").read_text() == "old" and core.is_complete(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_directory_replacing_accepts_a_result_another_writer_published_meanwhile(tmp_path,
                                                                                       monkeypatch) -> None:
    import os

    from mlsteps import core

    final = _finished_result(tmp_path)
    rename = os.rename

    def another_writer_first(source, target):
        if str(source).endswith(".partial") and not final.exists():
            other = tmp_path / "other"
            other.mkdir()
            (other / "result.json").write_text("other")
            (other / core.COMPLETE_MARKER).write_text("ok\n")
            rename(other, final)
        return rename(source, target)

    monkeypatch.setattr(os, "rename", another_writer_first)
    with core.atomic_directory(final, replace=True) as scratch:
        (scratch / "result.json").write_text("new")
    assert (final / "result.json").read_text() == "other" and core.is_complete(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_directory_removes_scratch_folders_of_writers_killed_long_ago_only(tmp_path) -> None:
    import os
    import time

    final = tmp_path / "result"
    killed = tmp_path / ".result.k1ll3d.partial"  # SIGKILL'd two days ago: no cleanup ran
    (killed / "shard").mkdir(parents=True)
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(killed, (two_days_ago, two_days_ago))
    live = tmp_path / ".result.wr1t1ng.partial"  # a concurrent writer, still at work
    live.mkdir()
    other = tmp_path / ".other.0ld.partial"  # another output's: not this one's to judge
    other.mkdir()
    os.utime(other, (two_days_ago, two_days_ago))
    with core.atomic_directory(final) as scratch:
        (scratch / "data").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.0ld.partial", ".result.wr1t1ng.partial", "result"]


def test_write_json_atomic_replaces_whole_file(tmp_path) -> None:
    path = tmp_path / "sub" / "r.json"
    core.write_json_atomic(path, {"a": 1})
    core.write_json_atomic(path, {"b": Path("/x")})
    assert json.loads(path.read_text()) == {"b": "/x"}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_write_json_atomic_flushes_the_content_to_disk_before_the_new_name_appears(tmp_path, monkeypatch) -> None:
    """Without it a node that loses power right after can come back with r.json empty (delayed allocation)."""
    path = tmp_path / "r.json"
    events = disk_events(monkeypatch)
    core.write_json_atomic(path, {"a": 1})

    publish = events.index(("replace", str(path)))
    flushed = [target for kind, target in events[:publish] if kind == "fsync"]
    assert any(Path(target).name.startswith(".r.json.") for target in flushed), events  # the temp file's content
    assert ("fsync", str(tmp_path)) in events[publish:], events  # and then the rename itself


def test_atomic_directory_flushes_every_file_before_the_folder_is_published(tmp_path, monkeypatch) -> None:
    final = tmp_path / "result"
    events = disk_events(monkeypatch)
    with core.atomic_directory(final) as scratch:
        (scratch / "shards").mkdir()
        (scratch / "shards" / "part-0").write_bytes(b"x" * 100)
        (scratch / "meta.json").write_text("{}")

    publish = events.index(("rename", str(final)))
    flushed = {Path(target).relative_to(scratch) for kind, target in events[:publish]
               if kind == "fsync" and Path(target).is_relative_to(scratch)}
    assert {Path("shards/part-0"), Path("meta.json"), Path(core.COMPLETE_MARKER), Path("shards")} <= flushed, events
    assert ("fsync", str(tmp_path)) in events[publish:], events


def test_a_filesystem_that_cannot_fsync_a_folder_still_gets_its_outputs(tmp_path, monkeypatch) -> None:
    """CIFS before Linux 4.17 and some FUSE / CSI drivers answer EINVAL: the step must not fail on that."""
    import errno
    import os
    import stat

    fsync = os.fsync

    def no_folder_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", no_folder_fsync)
    core.write_json_atomic(tmp_path / "r.json", {"a": 1})
    with core.atomic_directory(tmp_path / "result") as scratch:
        (scratch / "data").write_text("x")
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1} and core.is_complete(tmp_path / "result")

    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):  # a disk error is still one
        core.write_json_atomic(tmp_path / "r.json", {"a": 2})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}


def test_tensorflow_sizes_its_thread_pools_by_the_variables_the_pods_set() -> None:
    """The Kubernetes runtime bounds each step's TensorFlow threads by the pod's CPU limit through
    TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS (mlops_airflow.pods): TensorFlow must still read them."""
    import subprocess
    import sys

    from stepsupport import step_env

    script = ("import os, tensorflow as tf\n"
              "a = tf.random.normal((1000, 1000))\n"
              "tf.matmul(a, a).numpy()\n"
              "print(len(os.listdir('/proc/self/task')))\n")

    def threads(count: int) -> int:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                              env=step_env(TF_NUM_INTRAOP_THREADS=str(count), TF_NUM_INTEROP_THREADS=str(count)))
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    one, sixteen = threads(1), threads(16)
    assert sixteen - one >= 20, (one, sixteen)  # two pools of 16 instead of 1 (this machine has 2 cores)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_numpy_and_keras_cannot_take_is_named_with_its_range(seed) -> None:
    assert core.seed_error(seed) == f"--seed must be a whole number from 0 to 4294967295, got {seed}"
    assert core.seed_error(0) is None and core.seed_error(2**32 - 1) is None


@pytest.fixture
def quiet_logging(monkeypatch) -> None:
    """core.cli reconfigures the root logger; keep pytest's log capture intact."""
    monkeypatch.setattr(core, "setup_logging", lambda: None)


def test_cli_writes_result_json_and_returns_zero(tmp_path, quiet_logging) -> None:
    result_path = tmp_path / "result.json"
    code = core.cli(lambda config: {"name": config.name, "count": config.count}, DemoConfig, "demo",
                    ["--name", "x", "--count", "2", "--result-path", str(result_path)])
    assert code == 0
    assert json.loads(result_path.read_text()) == {"name": "x", "count": 2}


def test_cli_turns_step_error_into_exit_2_without_traceback(tmp_path, capsys, quiet_logging) -> None:
    def fail(config: DemoConfig) -> dict:
        raise StepError(f"cannot use {config.name}")

    result_path = tmp_path / "result.json"
    code = core.cli(fail, DemoConfig, "demo", ["--name", "x", "--result-path", str(result_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "error: cannot use x\n"
    assert not result_path.exists()


@pytest.mark.parametrize(
    ("run_key", "safe"),
    [
        ("mnist_training/manual__2026-01-01T00:00:00+00:00", "mnist_training_manual__2026-01-01T00_00_00_00_00"),
        ("../../etc", ".._.._etc"),
        ("plain-key_1.2", "plain-key_1.2"),
    ],
    ids=["airflow-run-id", "path-traversal", "already-safe"],
)
def test_run_keys_become_single_safe_folder_names(tmp_path, run_key, safe) -> None:
    import hashlib

    assert core.safe_name(run_key) == safe
    folder = tracking.run_dir(str(tmp_path), run_key)
    assert folder.parent == tmp_path.resolve() / "runs"
    # A key the safe name changed carries its hash: the readable part alone could be another key's.
    assert folder.name == (safe if safe == run_key else f"{safe}-{hashlib.sha256(run_key.encode()).hexdigest()[:8]}")


def test_the_longest_run_ids_airflow_takes_get_folders_the_filesystem_takes(tmp_path) -> None:
    """Airflow's run ids go up to 250 characters: with the DAG id and the hash, the folder name passed the
    filesystem's 255 and every step failed (errno 36, retried twice)."""
    keys = [f"mnist_training/{'a' * 249}{c}" for c in "bc"] + ["mnist_training/" + "é" * 235]  # 2 bytes each
    folders = [tracking.run_dir(str(tmp_path), key) for key in keys]
    for folder in folders:
        folder.mkdir(parents=True)
        assert folder.name.startswith("mnist_training_") and len(folder.name.encode()) <= 255
    assert folders[0] != folders[1]


def test_run_keys_that_differ_only_in_replaced_characters_get_their_own_folders(tmp_path) -> None:
    keys = ["mnist_training/retrain:v2", "mnist_training/retrain+v2", "mnist_training/retrain_v2",
            "mnist_training_retrain_v2"]
    assert len({core.safe_name(k) for k in keys}) == 1
    assert len({tracking.run_dir(str(tmp_path), k) for k in keys}) == len(keys)


@pytest.mark.parametrize(("expected", "visible", "fails"), [("", 0, False), ("0", 0, False), ("2", 2, False),
                                                            ("1", 0, True), ("4", 2, True)],
                         ids=["cpu-pod", "zero", "all-seen", "cuda-missing", "some-missing"])
def test_a_pod_given_gpus_that_tensorflow_cannot_see_refuses_to_train_on_the_cpu(monkeypatch, expected, visible,
                                                                                  fails) -> None:
    import types

    from mlsteps import core

    tf = types.SimpleNamespace(config=types.SimpleNamespace(
        list_physical_devices=lambda kind: [f"/physical_device:GPU:{i}" for i in range(visible)]))
    monkeypatch.setenv("MLSTEPS_EXPECTED_GPUS", expected)
    if fails:
        with pytest.raises(core.NodeError, match=rf"given {expected} GPU\(s\) but TensorFlow sees {visible}.*TF_EXTRAS"
                                                 r".*or set gpus to 0 in the trigger form"):
            core.require_gpus(tf)
        with pytest.raises(core.NodeError, match="or set search_gpus to 0 in the trigger form"):
            core.require_gpus(tf, param="search_gpus")
    else:
        assert core.require_gpus(tf) == visible


def test_a_node_fault_exits_1_so_the_runner_retries_and_a_step_error_exits_2(tmp_path, capsys) -> None:
    import dataclasses

    from mlsteps import core

    @dataclasses.dataclass(frozen=True)
    class Config:
        what: str = core.field("step", help="which error")

    def run(config: Config) -> dict:
        raise (core.NodeError if config.what == "node" else core.StepError)(f"{config.what} went wrong")

    result = ["--result-path", str(tmp_path / "r.json")]
    assert core.cli(run, Config, "t", ["--what", "node", *result]) == 1
    assert core.cli(run, Config, "t", ["--what", "step", *result]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: node went wrong", "error: step went wrong"]


def test_ctrl_c_ends_a_step_with_one_line_and_exit_130(tmp_path, capsys) -> None:
    import dataclasses

    from mlsteps import core

    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def run(config: Config) -> dict:
        raise KeyboardInterrupt

    assert core.cli(run, Config, "t", ["--result-path", str(tmp_path / "r.json")]) == 130
    assert capsys.readouterr().err.splitlines() == ["error: interrupted (Ctrl-C)"]
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(("where", "words"), [
    ("folder", "is a folder"),
    ("under-a-file/r.json", "is a file, not a folder"),
], ids=["a-folder", "under-a-file"])
def test_a_result_path_that_cannot_be_written_is_refused_before_the_step_works(tmp_path, capsys, where,
                                                                              words) -> None:
    """Not a traceback after the work is done (by hand, the default /airflow/xcom/return.json is one)."""
    import dataclasses

    from mlsteps import core

    (tmp_path / "folder").mkdir()
    (tmp_path / "under-a-file").write_text("")
    ran = []

    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    assert core.cli(lambda config: ran.append(1) or {}, Config, "t", ["--result-path", str(tmp_path / where)]) == 2
    assert not ran
    err = capsys.readouterr().err
    assert err.startswith(f"error: --result-path {tmp_path / where}: ") and words in err and "MLSTEPS_RESULT_PATH" in err


def test_a_terminated_step_runs_its_finally_blocks_and_stops_what_it_started(tmp_path) -> None:
    """As infra_validate does with its model server: started in a session of its own, stopped in `finally`."""
    import os
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "child.pid"
    script = f"""
import dataclasses, os, signal, subprocess, time
from mlsteps import core

@dataclasses.dataclass(frozen=True)
class Config:
    seconds: int = core.field(300, help="how long the child sleeps")

def run(config):
    child = subprocess.Popen(["sleep", str(config.seconds)], start_new_session=True)
    open({str(marker)!r}, "w").write(str(child.pid))
    try:
        time.sleep(config.seconds)
    finally:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait()
    return {{}}

raise SystemExit(core.cli(run, Config, "t", ["--result-path", {str(tmp_path / "r.json")!r}]))
"""
    step = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert step.poll() is None and time.monotonic() < deadline, "the step never started its child"
        time.sleep(0.1)
    child = int(marker.read_text())
    step.send_signal(signal.SIGTERM)
    assert step.wait(timeout=30) == 143  # as a plain SIGTERM death is reported by the runners: retried
    time.sleep(0.2)
    try:
        os.kill(child, 0)
        gone = subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True,
                              text=True).stdout.strip().startswith("Z")
    except ProcessLookupError:
        gone = True
    assert gone, "the step's child outlived it"
