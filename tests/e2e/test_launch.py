"""`mathlora-daemon launch`: mlx.launch supervised for launchd/systemd. The command line
it builds, then the real thing on loopback: a SIGTERM to `launch` stops every rank at one
step boundary with exit 0, and a rank that dies makes `launch` exit non-zero (75, rank
0's own status) so the service manager restarts the job.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.lock import probe_lock
from mathlora_daemon.service.launch import find_launcher, first_host, is_this_machine, launcher_argv

from runs import (
    DEADLINE_S,
    ENV,
    events,
    free_port_range,
    make_tiny_run,
    step_logged,
    stop_step,
    tiny_config,
    track,
    wait_for,
)


def test_the_command_line_runs_this_python_in_the_run_directory(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('[{"ssh": "10.0.0.1", "ips": ["10.0.0.1"]}, {"ssh": "10.0.0.2", "ips": ["10.0.0.2"]}]')
    argv = launcher_argv("/v/bin/mlx.launch", "/v/bin/python", RunDir(tmp_path), hostfile=hostfile, ranks=2,
                         backend="ring", starting_port=4000, run_args=["--set", "train.epochs=2"])
    assert argv == ["/v/bin/mlx.launch", "--backend", "ring", "--hostfile", str(hostfile.resolve()), "-n", "2",
                    "--starting-port", "4000", "--", "/v/bin/python", "-m", "mathlora_daemon", "run", "--run-dir",
                    str(tmp_path.resolve()), "--set", "train.epochs=2"]
    assert launcher_argv("l", "p", RunDir(tmp_path), hosts="10.0.0.1,10.0.0.2")[1:3] == ["--hosts", "10.0.0.1,10.0.0.2"]


@pytest.mark.parametrize("kwargs,message", [
    ({}, "exactly one of --hosts"),
    ({"hosts": "127.0.0.1", "hostfile": Path("x.json")}, "exactly one of --hosts"),
    ({"hostfile": Path("/nonexistent/hosts.json")}, "--hostfile /nonexistent/hosts.json: no such file"),
    ({"hosts": "127.0.0.1", "ranks": 0}, "-n 0: expected an integer >= 1"),
    ({"hostfile": "GARBAGE"}, "not a JSON hostfile"),
    ({"hostfile": "EMPTY"}, "expected a non-empty JSON list of hosts"),
])
def test_bad_launch_options_are_named(tmp_path, kwargs, message):
    if kwargs.get("hostfile") in ("GARBAGE", "EMPTY"):
        kwargs = {"hostfile": tmp_path / "hosts.json"}
        kwargs["hostfile"].write_text("{ not json" if "not a JSON" in message else "[]")
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        launcher_argv("l", "p", RunDir(tmp_path), **kwargs)


def test_mlx_launch_is_found_beside_the_interpreter_or_refused(tmp_path, monkeypatch):
    assert find_launcher(sys.executable) == str(Path(sys.executable).parent / "mlx.launch")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InputError, match="mlx.launch: not found beside"):
        find_launcher(str(tmp_path / "python"))


def test_rank_0_is_checked_to_be_this_machine(tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('{"hosts": [{"ssh": "studio.example", "ips": ["127.0.0.1"]}, {"ssh": "mbp", "ips": []}]}')
    assert first_host(None, hostfile) == ("studio.example", ["127.0.0.1"])
    assert first_host("10.1.2.3,10.1.2.4", None) == ("10.1.2.3", ["10.1.2.3"])
    assert first_host(None, tmp_path / "missing.json") == ("", [])
    assert is_this_machine("studio.example", ["127.0.0.1"]) and is_this_machine("localhost", [])
    assert not is_this_machine("203.0.113.7", ["203.0.113.7"])  # TEST-NET-3: nobody's address


@pytest.fixture
def job(tmp_path) -> Path:
    run = make_tiny_run(tmp_path / "run")
    cfg = tiny_config()
    cfg.train.batch_size, cfg.train.grad_accumulation_steps, cfg.train.epochs = 2, 4, 50
    from mathlora_daemon.config import to_toml

    (run / "mathlora.toml").write_text(to_toml(cfg))
    return run


def start_launch(run: Path) -> subprocess.Popen:
    return track(subprocess.Popen([sys.executable, "-m", "mathlora_daemon", "launch", "--run-dir", str(run), "--hosts",
                                   "127.0.0.1", "-n", "2", "--backend", "ring", "--starting-port",
                                   str(free_port_range(2))],
                                  env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))


def test_sigterm_to_launch_stops_every_rank_at_one_boundary_and_exits_0(job):
    proc = start_launch(job)
    wait_for(step_logged(job, 2), proc, "step 2")
    proc.send_signal(signal.SIGTERM)  # what launchd and systemd send
    _out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0, err
    step = events(job, "daemon.stop")[-1]["step"]
    assert events(job, "daemon.stop")[-1]["reason"] == "signal SIGTERM"
    worker_stops = [line for line in err.splitlines() if "daemon.stop" in line and "rank=1" in line]
    assert worker_stops and stop_step(worker_stops[-1]) == step  # the other rank stopped at the same boundary
    assert (job / "checkpoints" / f"step-{step:08d}").is_dir()
    assert not probe_lock(RunDir(job))[0]


def test_a_dead_rank_makes_launch_exit_non_zero_for_a_restart(job):
    proc = start_launch(job)
    wait_for(step_logged(job, 2), proc, "step 2")
    rank0 = probe_lock(RunDir(job))[1]
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if p.cmdline()[1:4] == ["-m", "mathlora_daemon", "run"]]
    other = [p for p in ranks if p.pid != rank0]
    assert len(ranks) == 2 and len(other) == 1
    other[0].kill()
    _out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 75, err  # rank 0's own status: temporary, restart the job
    assert "lost contact with the other ranks" in err
