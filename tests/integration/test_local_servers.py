"""mlflow/server.sh and scripts/serving.sh: one server per pid file, nothing left running after a failed start.

Stand-ins replace the real servers (MLFLOW_BIN, STEPS_PYTHON): a slow starter that answers its health
check after 3 s, and a model server that exits at once. The scripts, their pid files and their process
groups are the real ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from services import ROOT, free_port

SLOW_SERVER = textwrap.dedent("""\
    import http.server, sys, time
    port = int(sys.argv[sys.argv.index("--port") + 1])
    time.sleep(3)  # still starting when a second 'start' comes

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
""")


@pytest.fixture(autouse=True)
def _nothing_left_behind(tmp_path):
    """Whatever the outcome, no stand-in outlives its test (a failing script would leave it running)."""
    yield
    subprocess.run(["pkill", "-f", str(tmp_path)], check=False)


def _processes(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return out.stdout.split()


def _script(path: str, action: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / path), action], env=env, capture_output=True, text=True, timeout=120)


def _slow_mlflow_env(tmp_path: Path, port: int) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "python").exists():
        (bin_dir / "python").symlink_to(sys.executable)  # server.sh makes its webhook key with the bin's python
    fake = bin_dir / "mlflow"
    fake.write_text(f"#!{sys.executable}\n" + SLOW_SERVER)
    fake.chmod(0o755)
    return {**os.environ, "MLOPS_VAR": str(tmp_path / "var"), "MLFLOW_PORT": str(port), "MLFLOW_BIN": str(fake)}


def test_a_second_start_while_mlflow_is_still_starting_waits_for_it_and_stop_ends_it(tmp_path):
    env = _slow_mlflow_env(tmp_path, free_port())
    fake = Path(env["MLFLOW_BIN"])

    first = subprocess.Popen([str(ROOT / "mlflow/server.sh"), "start"], env=env, stdout=subprocess.PIPE, text=True)
    pidfile = tmp_path / "var" / "mlflow" / "server.pid"
    deadline = time.monotonic() + 30
    while not pidfile.exists() and time.monotonic() < deadline:  # the first server is starting
        time.sleep(0.1)
    second = _script("mlflow/server.sh", "start", env)
    assert first.wait(timeout=60) == 0 and second.returncode == 0, second.stderr
    assert len(_processes(str(fake))) == 1  # the second start waited for the first server
    assert _script("mlflow/server.sh", "status", env).stdout.startswith("running:")

    stopped = _script("mlflow/server.sh", "stop", env)
    assert _processes(str(fake)) == []
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    assert _script("mlflow/server.sh", "status", env).returncode == 3
    again = _script("mlflow/server.sh", "stop", env)  # says so rather than ending silently
    assert again.returncode == 0 and "was not running" in again.stdout


def test_two_starts_at_the_same_moment_launch_one_server(tmp_path):
    """make demo beside make airflow-ui: both checked "not running" before either wrote its pid file, and both
    launched one (the pid file could then name the one that lost the port, and stop orphan the other)."""
    env = _slow_mlflow_env(tmp_path, free_port())
    fake = Path(env["MLFLOW_BIN"])

    starts = [subprocess.Popen([str(ROOT / "mlflow/server.sh"), "start"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(start.wait(timeout=120), start.stderr.read()) for start in starts]
    assert [code for code, _ in outcomes] == [0, 0], outcomes
    assert len(_processes(str(fake))) == 1
    pid = (tmp_path / "var" / "mlflow" / "server.pid").read_text().strip()
    assert _processes(str(fake)) == [pid]  # the pid file names the server that runs
    assert _script("mlflow/server.sh", "stop", env).returncode == 0 and _processes(str(fake)) == []


def test_a_pid_file_naming_another_process_is_not_taken_for_the_server(tmp_path):
    # What a reused pid from before a reboot would name: a group leader (so that its group's members are looked
    # at, environment included), even one of another checkout's servers.
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True,
                                 env={**os.environ, "MLOPS_DAEMON": str(tmp_path / "elsewhere" / "mlflow")})
    try:
        state = tmp_path / "var" / "mlflow"
        state.mkdir(parents=True)
        (state / "server.pid").write_text(f"{bystander.pid}\n")
        env = {**os.environ, "MLOPS_VAR": str(tmp_path / "var"), "MLFLOW_PORT": str(free_port())}
        assert _script("mlflow/server.sh", "status", env).returncode == 3
        stopped = _script("mlflow/server.sh", "stop", env)
        assert bystander.poll() is None  # not signalled
        assert "was not running" in stopped.stdout and stopped.stderr == ""
    finally:
        bystander.kill()
        bystander.wait()


def _never_up_env(tmp_path: Path, start_seconds: int) -> dict[str, str]:
    """serving.sh's environment with a model server that fails at once (the real interpreter for -c: the
    admin token), waited for up to ``start_seconds``."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\n[[ $1 == -c ]] && exec {sys.executable} "$@"\necho "cannot start" >&2; exit 1\n')
    fake.chmod(0o755)
    return {**os.environ, "MLOPS_VAR": str(tmp_path / "var"), "SERVING_PORT": str(free_port()),
            "STEPS_PYTHON": str(fake), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
            "DAEMON_START_SECONDS": str(start_seconds)}


def test_a_model_server_that_never_comes_up_is_not_left_restarting(tmp_path):
    env = _never_up_env(tmp_path, 5)

    started = _script("scripts/serving.sh", "start", env)
    assert started.returncode == 1
    assert "did not come up" in started.stderr and "cannot start" in started.stderr
    time.sleep(3)  # a supervisor left behind would have restarted the server by now
    assert _processes(str(tmp_path)) == []  # neither the supervisor nor a server it restarted
    assert not (tmp_path / "var" / "serving" / "supervisor.pid").exists()
    assert _script("scripts/serving.sh", "status", env).returncode == 3


def test_a_start_interrupted_while_waiting_stops_the_supervisor_it_started(tmp_path):
    """Ctrl-C during `serving.sh start`: the supervisor runs in its own session and would not see it."""
    import signal

    env = _never_up_env(tmp_path, 60)
    # As from a terminal: SIGINT at its default (a test run started in the background inherits it ignored,
    # and bash cannot trap a signal ignored at its start).
    script = subprocess.Popen([str(ROOT / "scripts/serving.sh"), "start"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pidfile, log = tmp_path / "var" / "serving" / "supervisor.pid", tmp_path / "var" / "serving" / "server.log"
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and log.exists() and "restarting" in log.read_text()):
        assert time.monotonic() < deadline and script.poll() is None, script.stderr.read() if script.poll() else ""
        time.sleep(0.2)
    os.killpg(script.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends to the script's process group
    _, err = script.communicate(timeout=60)  # stopping may take daemon_stop's 15 s grace
    assert script.returncode == 130 and "interrupted: stopping the model server" in err, err
    time.sleep(3)  # a supervisor left behind would have restarted the server by now
    assert _processes(str(tmp_path)) == [] and not pidfile.exists()


def test_the_mlflow_server_runs_without_the_genai_job_runner(mlflow_server):
    """Its seven idle job workers cost ~25 CPU-seconds at every start; nothing here uses them."""
    pid = int((Path(mlflow_server.env["MLOPS_VAR"]) / "mlflow" / "server.pid").read_text())
    group = subprocess.run(["pgrep", "-a", "-g", str(pid)], capture_output=True, text=True).stdout
    assert "uvicorn" in group  # the server's own processes are there
    assert "huey" not in group, group


def test_a_start_on_another_port_is_refused_and_leaves_the_running_server_alone(tmp_path):
    first_port, other_port = free_port(), free_port()
    env = _slow_mlflow_env(tmp_path, first_port)
    assert _script("mlflow/server.sh", "start", env).returncode == 0
    elsewhere = {**env, "MLFLOW_PORT": str(other_port)}

    refused = _script("mlflow/server.sh", "start", elsewhere)
    assert refused.returncode == 1
    assert f"already running on http://127.0.0.1:{first_port}" in refused.stderr
    assert len(_processes(str(tmp_path / "bin" / "mlflow"))) == 1  # not stopped
    # Status and url follow the running server, not the environment's port.
    assert _script("mlflow/server.sh", "status", elsewhere).stdout.startswith(f"running: http://127.0.0.1:{first_port}")
    assert _script("mlflow/server.sh", "url", elsewhere).stdout.strip() == f"http://127.0.0.1:{first_port}"
    assert "stopped" in _script("mlflow/server.sh", "stop", elsewhere).stdout
    assert _processes(str(tmp_path / "bin" / "mlflow")) == []


def test_stop_ends_a_model_server_whose_supervisor_died_whatever_the_terminal_width(tmp_path):
    server = tmp_path / "server.py"
    server.write_text(SLOW_SERVER)
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\n[[ $1 == -c ]] && exec {sys.executable} "$@"\nexec {sys.executable} {server} "$@"\n')
    fake.chmod(0o755)
    # A narrow terminal: ps would cut the command lines before the state folder that marks them as ours.
    env = {**os.environ, "MLOPS_VAR": str(tmp_path / "var"), "SERVING_PORT": str(free_port()),
           "STEPS_PYTHON": str(fake), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "COLUMNS": "20"}
    assert _script("scripts/serving.sh", "start", env).returncode == 0
    supervisor = int((tmp_path / "var" / "serving" / "supervisor.pid").read_text())
    os.kill(supervisor, 9)  # the group's leader dies; the server it started goes on answering
    time.sleep(0.5)
    assert _script("scripts/serving.sh", "status", env).stdout.startswith("running")

    stopped = _script("scripts/serving.sh", "stop", env)
    assert "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    time.sleep(0.5)
    assert _processes(str(tmp_path)) == []


def test_stop_ends_an_mlflow_worker_whose_command_line_does_not_name_the_server(tmp_path):
    """mlflow server runs uvicorn as a child whose command line names no state folder; its leader killed, the
    worker went on holding the port while status said 'stopped' and stop 'was not running'."""
    token = f"worker-{uuid.uuid4().hex}"  # in the worker's command line, which does not hold tmp_path
    worker = SLOW_SERVER.replace("time.sleep(3)", f"pass  # {token}")
    env = _slow_mlflow_env(tmp_path, free_port())
    launcher = Path(env["MLFLOW_BIN"])
    launcher.write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                        f"port = sys.argv[sys.argv.index('--port') + 1]\n"
                        f"sys.exit(subprocess.call([sys.executable, '-c', {worker!r}, '--port', port]))\n")
    try:
        assert _script("mlflow/server.sh", "start", env).returncode == 0
        os.kill(int((tmp_path / "var" / "mlflow" / "server.pid").read_text()), 9)
        time.sleep(0.5)
        assert len(_processes(token)) == 1  # the worker goes on answering
        assert _script("mlflow/server.sh", "status", env).stdout.startswith("running")

        stopped = _script("mlflow/server.sh", "stop", env)
        assert "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
        time.sleep(0.5)
        assert _processes(token) == []
    finally:
        subprocess.run(["pkill", "-f", token], check=False)


def test_without_curl_a_start_fails_at_once_saying_so(tmp_path):
    bare = tmp_path / "bare-bin"  # the system's tools, less curl
    bare.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for tool in Path(folder).iterdir():
            if tool.name != "curl" and not (bare / tool.name).exists():
                (bare / tool.name).symlink_to(tool)
    env = {**_slow_mlflow_env(tmp_path, free_port()), "PATH": str(bare)}
    result = _script("mlflow/server.sh", "start", env)
    assert result.returncode == 1 and "curl not found" in result.stderr
    # Refused before starting anything (not after waiting for health checks that could never pass).
    assert _processes(str(tmp_path / "bin" / "mlflow")) == []
    assert not (tmp_path / "var" / "mlflow" / "server.pid").exists()


@pytest.mark.parametrize("recorded", ["0", "garbage", ""])
def test_a_pid_file_that_names_no_process_of_ours_stops_nothing(tmp_path, recorded):
    """pgrep -g 0 means the caller's own group: taken for the server, stop would signal its caller."""
    state = tmp_path / "var" / "serving"
    state.mkdir(parents=True)
    (state / "supervisor.pid").write_text(recorded + "\n")
    env = {**os.environ, "MLOPS_VAR": str(tmp_path / "var"), "SERVING_PORT": str(free_port())}
    stopped = subprocess.run([str(ROOT / "scripts/serving.sh"), "stop"], env=env, capture_output=True, text=True,
                             timeout=60, start_new_session=True)  # a regression kills this session, not pytest
    assert stopped.returncode == 0 and "was not running" in stopped.stdout, (stopped.returncode, stopped.stderr)


def test_a_server_started_before_urls_were_recorded_is_not_stopped_by_a_start_elsewhere(tmp_path):
    first_port = free_port()
    env = _slow_mlflow_env(tmp_path, first_port)
    assert _script("mlflow/server.sh", "start", env).returncode == 0
    (tmp_path / "var" / "mlflow" / "url").unlink()  # as a server started by the previous version of the script
    elsewhere = {**env, "MLFLOW_PORT": str(free_port())}
    refused = _script("mlflow/server.sh", "start", elsewhere)
    assert refused.returncode == 1 and "started before this script recorded it" in refused.stderr
    assert len(_processes(str(tmp_path / "bin" / "mlflow"))) == 1
    again = _script("mlflow/server.sh", "start", env)  # the same port: that server, found answering
    assert again.returncode == 0 and again.stdout.strip() == f"http://127.0.0.1:{first_port}"
    assert "stopped" in _script("mlflow/server.sh", "stop", env).stdout


def test_a_server_started_through_a_linked_folder_is_stopped_through_its_real_path(tmp_path):
    """make clean names the state folder by its real path ($(CURDIR)), a shell in a linked checkout by the link:
    the marker did not match, clean said "was not running", deleted var, and the server went on."""
    env = _slow_mlflow_env(tmp_path, free_port())
    fake = Path(env["MLFLOW_BIN"])
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert _script("mlflow/server.sh", "start", {**env, "MLOPS_VAR": str(tmp_path / "link" / "var")}).returncode == 0
    stopped = _script("mlflow/server.sh", "stop", {**env, "MLOPS_VAR": str(tmp_path / "real" / "var")})
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    assert _processes(str(fake)) == []


def test_a_stop_that_cannot_look_for_the_server_fails_and_keeps_its_pid_file(tmp_path):
    """pgrep missing or failing (a minimal image without procps) read as "not running": stop dropped the pid
    file and exited 0 while the server went on answering."""
    env = _slow_mlflow_env(tmp_path, free_port())
    fake = Path(env["MLFLOW_BIN"])
    assert _script("mlflow/server.sh", "start", env).returncode == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pgrep").write_text("#!/bin/sh\nexit 127\n")
    (broken / "pgrep").chmod(0o755)
    failed = _script("mlflow/server.sh", "stop", {**env, "PATH": f"{broken}:{os.environ['PATH']}"})
    assert failed.returncode != 0 and "pgrep failed" in failed.stderr and "procps" in failed.stderr
    assert (tmp_path / "var" / "mlflow" / "server.pid").exists() and _processes(str(fake))
    assert _script("mlflow/server.sh", "stop", env).returncode == 0 and _processes(str(fake)) == []


def test_a_webhook_key_in_the_environment_that_differs_from_the_servers_is_refused_and_a_first_one_kept(tmp_path):
    """The webhook secrets in MLflow's database are encrypted with the key: started under another one, MLflow
    could read no webhook (deliveries stopped, the registration script could not update it)."""
    env = {**_slow_mlflow_env(tmp_path, free_port()), "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": "key-given-first"}
    fake = Path(env["MLFLOW_BIN"])
    state = tmp_path / "var" / "mlflow"
    assert _script("mlflow/server.sh", "start", env).returncode == 0
    assert (state / "webhook-key").read_text().strip() == "key-given-first"  # kept for starts without it
    assert _script("mlflow/server.sh", "stop", env).returncode == 0
    refused = _script("mlflow/server.sh", "start", {**env, "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": "another-key"})
    assert refused.returncode != 0 and "differs from the key in" in refused.stderr
    assert _processes(str(fake)) == []
