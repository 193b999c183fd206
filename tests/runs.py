"""Helpers for tests that drive the real daemon as separate processes.

A tiny run directory (a 2-layer, 32-wide Llama, 64 rows of math) trains in a few seconds,
so the tests can start, signal, kill and restart the real `python -m daemon run`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mathlora_daemon.config import Config, DaemonConfig, DataConfig, LoraConfig, ModelConfig, TrainConfig, to_toml

ROOT = Path(__file__).resolve().parents[1]  # the repository
# XDG_STATE_HOME: where `run` records a run directory it cannot write; kept out of ~.
# WANDB_MODE: a test's W&B run stays on this machine whatever ~/.netrc holds.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
       "XDG_STATE_HOME": tempfile.mkdtemp(prefix="mathlora-tests-state-")}
STEPS_PER_EPOCH, EPOCHS = 8, 4  # 64 rows, 4 x 2 sequences a step
TOTAL = STEPS_PER_EPOCH * EPOCHS
DEADLINE_S = 300


def tiny_config() -> Config:
    return Config(
        model=ModelConfig(name="tests/tiny", path="mlx_model"),
        data=DataConfig(name="data/train.jsonl", max_seq_len=512, limit=64, validation_name="data/test.jsonl"),
        lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=["q_proj", "v_proj", "down_proj"]),
        train=TrainConfig(epochs=EPOCHS, batch_size=4, grad_accumulation_steps=2, learning_rate=2e-3, seed=7,
                          warmup_steps=3),
        daemon=DaemonConfig(keep_checkpoints=2, checkpoint_every_steps=4, prevent_sleep=False),
    )


def make_tiny_run(run: Path) -> Path:
    """Write a tiny model, data and mathlora.toml into `run` (no training)."""
    from mathlora_daemon.demo.assets import build_demo_model_dir
    from mathlora_daemon.demo.mathgen import write_demo_dataset
    from mathlora_daemon.training.template import format_example

    train, _ = write_demo_dataset(run / "data", n_train=80, n_test=4, seed=3)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    build_demo_model_dir(run / "mlx_model", [format_example(r["problem"], r["solution"]) for r in rows], seed=0,
                         vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    (run / "mathlora.toml").write_text(to_toml(tiny_config()))
    return run


def cli(*args: str, run: Path | None = None, timeout: float = 120, cwd: Path | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `mathlora-daemon ARGS` (with `--run-dir RUN` when given) as a user would, in the
    tests' environment plus `env` (a value of None removes a variable)."""
    extra = ["--run-dir", str(run)] if run is not None else []
    full = {k: v for k, v in {**ENV, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "mathlora_daemon", *args, *extra], capture_output=True, text=True,
                          env=full, timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd)


BOOKKEEPING = ("logs", "state", "daemon.lock", "report.json", "report.html")  # what any start may write


def snapshot(root: Path, skip: tuple[str, ...] = BOOKKEEPING, dirs: bool = True) -> dict[str, str]:
    """Every file under root -> sha256 of its bytes, except the daemon's own bookkeeping
    (`skip`: its log, state files, lock, report), whether root is the run directory or
    holds it as `run/`. With `dirs`, directories are listed too (as "<dir>"), so a removed
    or added empty directory counts as a change; links as "<link>"."""
    out = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] in skip or (len(rel.parts) > 1 and rel.parts[:2] in (("run", name) for name in skip)):
            continue
        if path.is_symlink():
            out[str(rel)] = "<link>"
        elif path.is_file():
            out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir() and dirs:
            out[str(rel)] = "<dir>"
    return out


STARTED: list[subprocess.Popen] = []  # reaped after every test (conftest), so a failed test leaves no daemon


def start(run_dir: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return track(subprocess.Popen([sys.executable, "-m", "mathlora_daemon", "run", "--run-dir", str(run_dir), *args],
                                  env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, text=True))


def track(proc: subprocess.Popen) -> subprocess.Popen:
    STARTED.append(proc)
    return proc


def reap() -> None:
    """SIGKILL every process a test started that still runs, with its children."""
    import psutil

    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is not None:
            continue
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for p in [*children]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.kill()
        proc.wait(timeout=60)


def finish(proc: subprocess.Popen, expect: int = 0) -> str:
    _out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == expect, err
    return err


def wait_for(predicate, proc: subprocess.Popen | None = None, what: str = "condition",
             timeout_s: float = DEADLINE_S, interval_s: float = 0.01):
    """Poll `predicate()` until it returns something truthy and return that (an event
    wait with a deadline, not a timed race); fail after `timeout_s`, or early when `proc`
    exits first. The one polling helper of the tests."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}: {err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)


def step_logged(run: Path, at_least: int):
    """A wait_for predicate: a train.step of at least this step is in the log."""
    return lambda: any(e["step"] >= at_least for e in events(run, "train.step"))


def hold(run_dir: Path, point: str, marker_dir: Path, *args: str) -> subprocess.Popen:
    """Start the daemon and return it once it blocks at a test hold point (alive)."""
    marker = marker_dir / f"reached-{point.replace('@', '-')}-{len(list(marker_dir.glob('reached-*')))}"
    proc = start(run_dir, *args, env={"MATHLORA_TEST_HOLD": f"{point}:{marker}"})
    wait_for(marker.exists, proc, f"hold point {point}")
    return proc


def kill_at(run_dir: Path, point: str, marker_dir: Path, *args: str) -> None:
    """Start the daemon, wait until it reaches the hold point, SIGKILL it."""
    proc = hold(run_dir, point, marker_dir, *args)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def events(run_dir: Path, name: str | None = None) -> list[dict]:
    path = run_dir / "logs" / "daemon.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    # A live daemon may be writing the last line right now (a write that crosses a page
    # is seen in two parts): only lines that end with a newline are complete.
    lines = text.split("\n")[:-1]
    out = [json.loads(line) for line in lines if line.strip()]
    for e in out:  # the log contract holds for every line
        assert {"ts", "level", "event", "run"} <= e.keys(), e
    return [e for e in out if name is None or e["event"] == name]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest)
    return dest


def assert_matches_reference(run: Path, reference: dict) -> None:
    assert sha(run / "adapters" / "adapters.safetensors") == reference["adapters"]
    logged = events(run, "train.step")
    assert {e["step"] for e in logged} == set(range(1, TOTAL + 1))
    for e in logged:  # every loss ever logged, re-done steps included, equals the reference
        assert e["loss"] == reference["losses"][e["step"]], e


# --- distributed jobs: several ranks on loopback, the ring backend --------------------

def free_ports(count: int) -> list[int]:
    """Ask the kernel for `count` free loopback ports (held until all are picked)."""
    import socket

    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(count: int) -> int:
    """Return a base port such that base .. base+count-1 are free (mlx.launch's ring
    backend takes consecutive ports from --starting-port)."""
    import random
    import socket

    for _ in range(200):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free port range")


def ring_hostfile(path: Path, ranks: int) -> Path:
    """Write the ring backend's hostfile (what mlx.launch writes): one address per rank."""
    path.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(ranks)]))
    return path


def start_ranks(run_dir: Path, ranks: int, hostfile: Path, args: dict | None = None,
                env: dict | None = None) -> list[subprocess.Popen]:
    """Start `ranks` daemons as mlx.launch would (MLX_RANK + MLX_HOSTFILE), with extra
    arguments and environment per rank; return them in rank order."""
    ring_hostfile(hostfile, ranks)
    return [start(run_dir, *(args or {}).get(rank, ()),
                  env={"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile), **(env or {}).get(rank, {})})
            for rank in range(ranks)]


def finish_all(procs: list[subprocess.Popen], expect: int = 0) -> list[str]:
    """Wait for every rank; assert each exits `expect`; return their stderr."""
    errs = []
    for proc in procs:
        _out, err = proc.communicate(timeout=DEADLINE_S)
        errs.append(err)
    for rank, (proc, err) in enumerate(zip(procs, errs)):
        assert proc.returncode == expect, f"rank {rank} exited {proc.returncode}:\n{err}"
    return errs


def mlx_launch(run_dir: Path, ranks: int, *args: str, timeout: float = DEADLINE_S) -> subprocess.CompletedProcess:
    """Run the job through the real `mlx.launch` (ring backend, loopback)."""
    launcher = Path(sys.executable).parent / "mlx.launch"
    base = free_port_range(ranks)
    argv = [str(launcher), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(ranks), "--starting-port",
            str(base), "--", sys.executable, "-m", "mathlora_daemon", "run", "--run-dir", str(run_dir), *args]
    proc = track(subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  stdin=subprocess.DEVNULL))
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def stop_step(stderr: str) -> int:
    """The step in a rank's `daemon.stop` console line."""
    import re

    found = re.findall(r"daemon\.stop\s.*?\bstep=(\d+)", stderr)
    assert found, stderr
    return int(found[-1])
