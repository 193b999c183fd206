"""Chaos soak: one training run survives N random faults and ends bit-identical to a run
that was never interrupted.

What it proves (docs/DESIGN.md, sections 3, 4 and 7): a run of the real daemon, driven the
way launchd drives it (KeepAlive {SuccessfulExit: false}: started again after every
non-zero exit; after an exit 0 with the run unfinished, started again as the user would
the next night), that meets faults of every kind at random moments

  sigkill            SIGKILL
  sigterm, sigint,   a graceful-stop signal (expects a checkpoint and exit 0)
  sigquit
  sigint_twice       Ctrl-C twice (exit 130, or 0 when the first already ended the run)
  sigstop_cont       SIGSTOP, a random pause, SIGCONT (training goes on)
  torn_checkpoint    one file of the newest checkpoint truncated or bit-flipped while the
                     daemon is down (a running daemon is SIGKILLed first); the next start
                     must log `checkpoint.rejected` for it and resume from an older one
  disk_full          the run directory's tmpfs filled with a ballast file: the checkpoint
                     save fails with ENOSPC and the daemon must exit 75; the disk stays full
                     across one restart (75 again), then is freed
  cli_stop,          `mathlora-daemon pause` / `resume` / `stop` through the real CLI
  cli_pause_resume,
  cli_pause_stop
  kill_in_validation SIGKILL while the validation pass of a checkpoint runs

at moments drawn from: `startup` (a random delay after the start), `steps` (after k more
`train.step` events in logs/daemon.jsonl, plus jitter), `validation` (just after a
`train.step`, inside the validation pass that the checkpoint of that step starts),
`hold_micro` / `hold_save` (the daemon's own MATHLORA_TEST_HOLD points, daemon/testhooks.py:
between the two micro-batches of a step, halfway through writing a checkpoint; released
after the fault) ends with

  - adapters/adapters.safetensors bit-identical to the uninterrupted reference run's,
  - every per-step loss (train.step, by step, last occurrence) identical, every step
    1..total logged, and no logged occurrence of a step differing (the determinism contract),
  - `status` saying `finished`, `checkpoints verify` passing, no temporary checkpoint left,

and that every start along the way kept the contracts: an exit code in the contract
(0; 75 only with a full disk; 130 only after a doubled SIGINT; -9 only after SIGKILL;
anything else is a defect), no "Traceback" in the daemon's stdout/stderr, an exit 0 only
when the run finished or a stop was asked, and every control request the CLI answered as
accepted (exit 0) acted on: a `control.<command>` event with that id in the log.

The run is the tests' tiny run (tests/runs.py: a 2-layer, 32-wide Llama, 64 rows, LoRA
dropout 0.1) with a checkpoint every step, a validation set (so every checkpoint runs a
validation pass) and enough epochs to host the faults. Its directory lives on a small
tmpfs mounted here (needs root) so that a full disk is real; without root
(`--disk hook`, or `auto` when mounting fails) the full disk is the daemon's ENOSPC hook
(MATHLORA_TEST_ENOSPC) instead.

    sudo .venv/bin/python bench/chaos_soak.py --faults 100 --seed 1 --out soak.json

Exit status: 0 when no defect was found, 1 otherwise. The JSON report (`--out`) has every
fault (kind, moment, exit code, seconds, details), every start, the checks and the defects.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

KINDS = ("sigkill", "sigterm", "sigint", "sigint_twice", "sigquit", "sigstop_cont", "torn_checkpoint", "disk_full",
         "cli_stop", "cli_pause_resume", "cli_pause_stop", "kill_in_validation")
SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigquit": signal.SIGQUIT,
           "kill_in_validation": signal.SIGKILL}
# The moments each kind may meet; `startup` and the hold points need a fresh start.
MOMENTS = {
    **{k: ("startup", "steps", "validation", "hold_micro", "hold_save")
       for k in ("sigkill", "sigterm", "sigint", "sigint_twice", "sigquit", "cli_stop", "cli_pause_resume",
                 "cli_pause_stop")},
    "sigstop_cont": ("startup", "steps", "validation"),
    "disk_full": ("startup", "steps", "validation"),
    "torn_checkpoint": ("down",),
    "kill_in_validation": ("validation",),
}
FRESH_ONLY = {"startup", "hold_micro", "hold_save"}
STOPPING = {"sigterm", "sigint", "sigquit", "cli_stop", "cli_pause_stop"}
ROWS_PER_EPOCH_STEPS = 8  # the tiny run: 64 rows, 4 x 2 sequences a step
WAIT_S = 120.0  # the longest any single expectation may take before it is a hang
ID_RE = re.compile(r"\(id ([0-9A-Za-z_-]{4,64})\)")


# --- the run ----------------------------------------------------------------------------

def soak_config(steps: int, val_rows: int):
    """The tiny tests' config with a checkpoint (and validation pass) every step."""
    from runs import tiny_config

    cfg = tiny_config()
    cfg.train.epochs = max(1, -(-steps // ROWS_PER_EPOCH_STEPS))
    cfg.train.eval_sequences = val_rows
    cfg.daemon.checkpoint_every_steps = 1
    cfg.daemon.keep_checkpoints = 2
    # The soak's SIGKILLs at start-up are not a crash loop; the guard is tested elsewhere.
    cfg.daemon.max_crash_restarts = 1000
    return cfg


def make_template(run: Path, steps: int, val_rows: int) -> int:
    """Write the tiny model, data (with `val_rows` held-out rows) and config; return the
    run's total steps."""
    from mathlora_daemon.config import to_toml
    from mathlora_daemon.demo.assets import build_demo_model_dir
    from mathlora_daemon.demo.mathgen import write_demo_dataset
    from mathlora_daemon.training.template import format_example

    train, _ = write_demo_dataset(run / "data", n_train=64 + 16, n_test=val_rows, seed=3)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    build_demo_model_dir(run / "mlx_model", [format_example(r["problem"], r["solution"]) for r in rows], seed=0,
                         vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    cfg = soak_config(steps, val_rows)
    (run / "mathlora.toml").write_text(to_toml(cfg))
    return cfg.train.epochs * ROWS_PER_EPOCH_STEPS


def daemon_env(state_dir: Path, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MATHLORA_TEST_")}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": str(state_dir)})
    env.update(extra or {})
    return env


def _no_core():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def source_hashes() -> dict[str, str]:
    """SHA-256 of every Python file of the daemon and the checkpoint store: the soak
    notes when the tree it measures changed under it (a reference made by other code)."""
    return {str(f.relative_to(ROOT)): sha(f) for d in ("daemon", "checkpoints") for f in sorted((ROOT / d).rglob("*.py"))}


def tensors_equal(a: Path, b: Path) -> bool | None:
    """Whether two safetensors files hold the same names, dtypes and bits (None: unreadable)."""
    try:
        import mlx.core as mx

        x, y = mx.load(str(a)), mx.load(str(b))
    except Exception:  # noqa: BLE001 (a missing or torn file: no answer)
        return None
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].shape == y[k].shape
                                        and bool(mx.array_equal(x[k], y[k]).item()) for k in x)


class Log:
    """logs/daemon.jsonl read incrementally (complete lines only)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.events, self.partial = path, 0, [], b""

    def refresh(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return self.events
        self.offset += len(data)
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        for line in lines:
            if line.strip():
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    self.events.append({"event": "<unparsable log line>", "raw": line[:300].decode(errors="replace")})
        return self.events

    def since(self, index: int, name: str | None = None) -> list[dict]:
        return [e for e in self.refresh()[index:] if name is None or e.get("event") == name]


class Daemon:
    """One start of `mathlora-daemon run`, as launchd starts it (stdin not a terminal)."""

    def __init__(self, soak: "Soak", env_extra: dict | None = None, fault: int | None = None):
        self.index = len(soak.starts)
        self.soak, self.fault = soak, fault
        self.out_path = soak.workdir / "starts" / f"{self.index:03d}.out"
        self.err_path = soak.workdir / "starts" / f"{self.index:03d}.err"
        self.out_path.parent.mkdir(exist_ok=True)
        self.log_index = len(soak.log.refresh())
        self.t0 = time.monotonic()
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mathlora_daemon", "run", "--run-dir", str(soak.run)],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=soak.workdir, start_new_session=True,
                env=daemon_env(soak.state_dir, env_extra), preexec_fn=_no_core)
        self.record = {"start": self.index, "pid": self.proc.pid, "fault": fault,
                       "env": {k: v for k, v in (env_extra or {}).items()}, "exit_code": None, "seconds": None}
        soak.starts.append(self.record)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def events(self, name: str | None = None) -> list[dict]:
        return self.soak.log.since(self.log_index, name)

    def steps(self) -> list[int]:
        return [e["step"] for e in self.events("train.step")]

    def finished(self) -> bool:
        return any(e.get("event") == "train.done" or (e.get("event") == "daemon.stop" and e.get("reason") == "finished")
                   for e in self.events())

    def signal(self, sig: int) -> bool:
        if not self.alive():
            return False
        try:
            os.kill(self.proc.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def wait(self, timeout: float = WAIT_S) -> int | None:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self.record["exit_code"] = rc
        self.record["seconds"] = round(time.monotonic() - self.t0, 2)
        return rc

    def kill_hard(self) -> int:
        try:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.wait(60)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")


# --- the soak ---------------------------------------------------------------------------

class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-soak-")).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.workdir / "xdg-state"
        self.disk = self.workdir / "disk"
        self.mounted = False
        self.run = self.disk / "run"
        self.log = Log(self.run / "logs" / "daemon.jsonl")
        self.starts: list[dict] = []
        self.faults: list[dict] = []
        self.defects: list[dict] = []
        self.accepted: list[dict] = []  # control requests the CLI answered as accepted
        self.daemon: Daemon | None = None
        self.eval_s = 0.1
        self.step_s = 0.3
        self.total_steps = 0
        self.disk_mode = args.disk
        self.ballast = self.disk / "ballast"

    # -- set-up and tear-down ------------------------------------------------------------
    def mount(self) -> None:
        self.disk.mkdir(exist_ok=True)
        if self.disk_mode in ("tmpfs", "auto"):
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.args.disk_mb}m,mode=0700", "tmpfs",
                                   str(self.disk)], capture_output=True, text=True)
            if proc.returncode == 0:
                self.mounted, self.disk_mode = True, "tmpfs"
                return
            if self.disk_mode == "tmpfs":
                raise SystemExit(f"mount -t tmpfs failed (root needed): {proc.stderr.strip()}")
            print(f"# no tmpfs ({proc.stderr.strip()}): a full disk is the daemon's ENOSPC hook", file=sys.stderr)
        self.disk_mode = "hook"

    def unmount(self) -> None:
        if self.mounted:
            for _ in range(20):
                if subprocess.run(["umount", str(self.disk)], capture_output=True).returncode == 0:
                    self.mounted = False
                    return
                time.sleep(0.5)
            subprocess.run(["umount", "-l", str(self.disk)], capture_output=True)
            self.mounted = False

    def prepare(self) -> dict:
        """Build the template, run the uninterrupted reference, copy the template onto the disk."""
        self.sources = source_hashes()
        template = self.workdir / "template"
        if template.exists():
            shutil.rmtree(template)
        template.mkdir()
        self.total_steps = make_template(template, self.args.steps, self.args.val_rows)
        ref = self.workdir / "reference"
        if ref.exists():
            shutil.rmtree(ref)
        shutil.copytree(template, ref)
        t0 = time.monotonic()
        with open(self.workdir / "reference.err", "w") as err:
            rc = subprocess.run([sys.executable, "-m", "mathlora_daemon", "run", "--run-dir", str(ref)],
                                stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, cwd=self.workdir,
                                env=daemon_env(self.state_dir), timeout=3600).returncode
        seconds = time.monotonic() - t0
        if rc != 0:
            raise SystemExit(f"the reference run exited {rc}: see {self.workdir / 'reference.err'}")
        events = Log(ref / "logs" / "daemon.jsonl").refresh()
        losses = {e["step"]: e["loss"] for e in events if e.get("event") == "train.step"}
        assert sorted(losses) == list(range(1, self.total_steps + 1)), "reference run missed steps"
        evals = sorted(e["seconds"] for e in events if e.get("event") == "train.eval" and e.get("step", 0) > 0)
        steps = sorted(e["step_s"] for e in events if e.get("event") == "train.step")
        self.eval_s = evals[len(evals) // 2] if evals else 0.05
        self.step_s = steps[len(steps) // 2] if steps else 0.3
        self.reference = {"adapters": sha(ref / "adapters" / "adapters.safetensors"), "losses": losses,
                          "seconds": round(seconds, 1), "eval_s": self.eval_s, "step_s": self.step_s}
        shutil.copytree(template, self.run)
        return self.reference

    # -- defects -------------------------------------------------------------------------
    def defect(self, what: str, fault: dict | None = None, daemon: Daemon | None = None, **evidence) -> None:
        d = {"what": what, **evidence}
        if fault is not None:
            d.update(fault=fault["index"], kind=fault["kind"], moment=fault["moment"])
            fault.setdefault("defects", []).append(what)
        if daemon is not None:
            d["start"] = daemon.index
            d["exit_code"] = daemon.record["exit_code"]
            d["log_tail"] = [_brief(e) for e in daemon.events()[-10:]]
            d["output_tail"] = daemon.output()[-2500:]
        self.defects.append(d)
        print(f"  DEFECT: {what}", file=sys.stderr)

    def check_exit(self, daemon: Daemon, rc: int | None, expected: set, fault: dict | None, stop_asked: bool) -> None:
        """The checks after every start: exit code, tracebacks, an unasked exit 0."""
        if rc is None:
            self.defect(f"start {daemon.index} did not exit within {WAIT_S:.0f} s (expected {sorted(expected)})",
                        fault, daemon)
            daemon.kill_hard()
            return
        if "Traceback" in daemon.output():
            self.defect(f"Traceback in the output of start {daemon.index} (exit {rc})", fault, daemon)
        if rc not in expected:
            self.defect(f"start {daemon.index} exited {rc}, expected {sorted(expected)}", fault, daemon)
        elif rc == 0 and not stop_asked and not daemon.finished():
            self.defect(f"start {daemon.index} exited 0 with the run unfinished and no stop asked", fault, daemon)

    # -- starting --------------------------------------------------------------------------
    def ensure_running(self, fault: dict, env_extra: dict | None = None) -> Daemon:
        if self.daemon is None or not self.daemon.alive():
            self.daemon = Daemon(self, env_extra, fault["index"])
            fault["fresh_start"] = True
        return self.daemon

    def resume_step(self) -> int:
        """The newest checkpoint's step on disk (a guess at where the next start resumes)."""
        ckpts = self.run / "checkpoints"
        steps = [int(p.name.split("-")[1]) for p in ckpts.glob("step-*") if p.name.split("-")[1].isdigit()] \
            if ckpts.is_dir() else []
        return max(steps, default=0)

    def run_finished(self) -> bool:
        return any(e.get("event") == "train.done" for e in self.log.refresh())

    # -- moments -----------------------------------------------------------------------------
    def wait_for(self, predicate, daemon: Daemon, timeout: float = WAIT_S) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.log.refresh()
            if predicate():
                return True
            if not daemon.alive():
                return bool(predicate())
            time.sleep(0.01)
        return False

    def reach(self, fault: dict, daemon: Daemon) -> bool:
        """Wait for the fault's moment; return whether the daemon is still alive there.
        Fills fault["moment_detail"]."""
        m, rng, detail = fault["moment"], self.rng, fault.setdefault("moment_detail", {})
        if m == "startup":
            delay = rng.uniform(0.0, self.args.startup_s)
            detail["delay_s"] = round(delay, 3)
            end = daemon.t0 + delay
            while time.monotonic() < end and daemon.alive():
                time.sleep(0.005)
        elif m in ("steps", "validation", "down"):
            k = rng.randint(1, 4) if m != "validation" else rng.randint(1, 2)
            detail["after_steps"] = k
            have = len(daemon.steps())
            if not self.wait_for(lambda: len(daemon.steps()) >= have + k, daemon):
                return daemon.alive()
            if m == "validation":
                step = daemon.steps()[-1]
                jitter = rng.uniform(0.0, 0.7 * self.eval_s)
                time.sleep(jitter)
                self.log.refresh()
                evaluated = any(e.get("step") == step for e in daemon.events("train.eval"))
                detail.update(step=step, jitter_s=round(jitter, 3), eval_logged_before_fault=evaluated)
            else:
                jitter = rng.uniform(0.0, self.step_s)
                time.sleep(jitter)
                detail["jitter_s"] = round(jitter, 3)
        elif m in ("hold_micro", "hold_save"):
            marker, at = Path(fault["hold"]["marker"]), fault["hold"]["step"]
            # micro@S holds before train.step S is logged; save@S after it (the save follows the step).
            past = at if m == "hold_micro" else at + 1
            reached = self.wait_for(lambda: marker.exists() or any(s >= past for s in daemon.steps()), daemon)
            detail.update(step=at, reached=marker.exists())
            if not marker.exists():
                fault["moment"] = m + "_missed"  # resumed past the step (a torn checkpoint, a kill): fire now
                return daemon.alive() and reached
        return daemon.alive()

    def hold_env(self, fault: dict) -> dict:
        point = "micro" if fault["moment"] == "hold_micro" else "save"
        step = self.resume_step() + self.rng.randint(1, 3)
        marker = self.workdir / "holds" / f"reached-{fault['index']}"
        release = self.workdir / "holds" / f"release-{fault['index']}"
        marker.parent.mkdir(exist_ok=True)
        fault["hold"] = {"point": point, "step": step, "marker": str(marker), "release": str(release)}
        return {"MATHLORA_TEST_HOLD": f"{point}@{step}:{marker}:{release}"}

    def release(self, fault: dict, after: float | None = None) -> None:
        if "hold" in fault:
            time.sleep(self.rng.uniform(0.0, 0.4) if after is None else after)
            Path(fault["hold"]["release"]).write_text("go")

    # -- the CLI -----------------------------------------------------------------------------
    def cli(self, command: str, fault: dict, daemon: Daemon | None) -> dict:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "mathlora_daemon", command, "--run-dir", str(self.run)],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=self.workdir,
                              env=daemon_env(self.state_dir), timeout=120)
        text = proc.stdout + proc.stderr
        found = ID_RE.search(text) or re.search(r"\bid[ =:]+([0-9a-f]{8})", text)
        answer = {"command": command, "rc": proc.returncode, "id": found.group(1) if found else None,
                  "said": text.strip()[-400:], "seconds": round(time.monotonic() - t0, 2)}
        if "Traceback" in text:
            self.defect(f"Traceback in `{command}`'s output", fault, daemon, cli=answer)
        if proc.returncode == 0:
            if not answer["id"]:
                self.defect(f"`{command}` exited 0 without naming the request id", fault, daemon, cli=answer)
            self.accepted.append({**answer, "fault": fault["index"]})
        elif proc.returncode == 1:
            if "no daemon" not in text:
                self.defect(f"`{command}` exited 1 without saying no daemon runs", fault, daemon, cli=answer)
        elif proc.returncode == 75 and daemon is not None and daemon.alive():
            self.defect(f"`{command}` got no acknowledgement from a running, unsuspended daemon", fault, daemon,
                        cli=answer)
        else:
            if proc.returncode != 75:
                self.defect(f"`{command}` exited {proc.returncode}", fault, daemon, cli=answer)
        fault.setdefault("cli", []).append(answer)
        return answer

    def acted(self, answer: dict, daemon: Daemon, timeout: float = 60.0) -> bool:
        """Wait for the control event of an accepted request (or the daemon's exit)."""
        if answer["rc"] != 0 or not answer["id"]:
            return False
        name = f"control.{answer['command']}"
        seen = lambda: any(str(e.get("id", "")).startswith(answer["id"]) for e in self.log.refresh() if
                           e.get("event") == name)
        return self.wait_for(seen, daemon, timeout)

    # -- faults ------------------------------------------------------------------------------
    def plan(self, n: int) -> list[str]:
        kinds = list(KINDS)
        self.rng.shuffle(kinds)
        kinds = kinds[:n]
        kinds += [self.rng.choice(KINDS) for _ in range(n - len(kinds))]
        self.rng.shuffle(kinds)
        return kinds

    def apply(self, index: int, kind: str) -> dict:
        rng = self.rng
        running = self.daemon is not None and self.daemon.alive()
        moments = [m for m in MOMENTS[kind] if not (running and m in FRESH_ONLY)]
        fault = {"index": index, "kind": kind, "moment": rng.choice(moments), "exit_code": None, "applied": True}
        self.faults.append(fault)
        t0 = time.monotonic()
        try:
            getattr(self, f"_fault_{kind}", self._fault_signal)(fault)
        finally:
            fault["seconds"] = round(time.monotonic() - t0, 2)
            if not fault["applied"]:
                fault["note"] = fault.get("note", "not applied")
        return fault

    def _start_for(self, fault: dict) -> Daemon:
        env = self.hold_env(fault) if fault["moment"] in ("hold_micro", "hold_save") else None
        return self.ensure_running(fault, env)

    def _ended(self, fault: dict, daemon: Daemon, expected: set, stop_asked: bool) -> int | None:
        rc = daemon.wait()
        fault["exit_code"] = rc
        self.check_exit(daemon, rc, expected, fault, stop_asked)
        return rc

    def _fault_signal(self, fault: dict) -> None:
        """sigkill, sigterm, sigint, sigquit, kill_in_validation."""
        kind = fault["kind"]
        daemon = self._start_for(fault)
        if not self.reach(fault, daemon):
            return self._exited_early(fault, daemon)
        sent_at = time.time()
        daemon.signal(SIGNALS[kind])
        fault["moment_detail"]["sent_at"] = sent_at
        if kind in ("sigkill", "kill_in_validation"):
            self._ended(fault, daemon, {-signal.SIGKILL}, stop_asked=True)
            if kind == "kill_in_validation" or fault["moment"] == "validation":
                step = fault["moment_detail"].get("step")
                fault["moment_detail"]["landed_in_validation"] = not any(
                    e.get("step") == step for e in daemon.events("train.eval"))
            return
        self.release(fault)
        self._ended(fault, daemon, {0}, stop_asked=True)

    def _fault_sigint_twice(self, fault: dict) -> None:
        daemon = self._start_for(fault)
        if not self.reach(fault, daemon):
            return self._exited_early(fault, daemon)
        daemon.signal(signal.SIGINT)
        gap = self.rng.uniform(0.0, 0.3)
        time.sleep(gap)
        second = daemon.signal(signal.SIGINT)
        fault["moment_detail"].update(gap_s=round(gap, 3), second_sent=second)
        self.release(fault)
        self._ended(fault, daemon, {130, 0} if second else {0}, stop_asked=True)

    def _fault_sigstop_cont(self, fault: dict) -> None:
        daemon = self._start_for(fault)
        if not self.reach(fault, daemon):
            return self._exited_early(fault, daemon)
        have = len(daemon.steps())
        daemon.signal(signal.SIGSTOP)
        pause = self.rng.uniform(0.3, self.args.stop_pause_s)
        time.sleep(pause)
        daemon.signal(signal.SIGCONT)
        fault["moment_detail"]["paused_s"] = round(pause, 3)
        if not self.wait_for(lambda: len(daemon.steps()) > have or daemon.finished(), daemon):
            if daemon.alive():
                self.defect("no training step within 120 s after SIGCONT", fault, daemon)
            else:
                self._ended(fault, daemon, {0}, stop_asked=False)

    def _fault_torn_checkpoint(self, fault: dict) -> None:
        daemon = self.daemon
        if daemon is not None and daemon.alive():
            fault["moment"] = "steps"
            if not self.reach(fault, daemon):
                return self._exited_early(fault, daemon)
            daemon.signal(signal.SIGKILL)
            self._ended(fault, daemon, {-signal.SIGKILL}, stop_asked=True)
            fault["prelude"] = "SIGKILL"
        ckpts = sorted(p for p in (self.run / "checkpoints").glob("step-*") if p.is_dir()) \
            if (self.run / "checkpoints").is_dir() else []
        if not ckpts:
            fault["applied"], fault["note"] = False, "no checkpoint yet"
            return
        newest = ckpts[-1]
        mode = self.rng.choice(("truncate", "flip"))
        names = ["adapters.safetensors", "optimizer.safetensors", "trainer_state.json"] + \
            (["MANIFEST.json"] if mode == "truncate" else [])
        path = newest / self.rng.choice(names)
        if not path.exists():
            fault["applied"], fault["note"] = False, f"{path.name} missing"
            return
        data = bytearray(path.read_bytes())
        if mode == "truncate":
            data = data[: self.rng.randrange(0, max(1, len(data)))]
        else:
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        path.write_bytes(bytes(data))
        fault["torn"] = {"checkpoint": newest.name, "file": path.name, "mode": mode,
                         "log_index": len(self.log.refresh())}
        self.torn.append(fault)  # a later start must reject it: checked at the end (check_torn)

    def _fault_disk_full(self, fault: dict) -> None:
        if self.disk_mode == "hook":
            return self._disk_full_hook(fault)
        daemon = self.ensure_running(fault)
        if not self.reach(fault, daemon):
            return self._exited_early(fault, daemon)
        fault["ballast_bytes"] = self.fill()
        rc = self._ended(fault, daemon, {75}, stop_asked=False)
        # launchd starts it again at once: the disk is still full.
        again = Daemon(self, None, fault["index"])
        self.daemon = again
        rc2 = again.wait()
        fault["exit_code_full_restart"] = rc2
        self.check_exit(again, rc2, {75}, fault, stop_asked=False)
        self.free()
        fault["exit_code"] = rc

    def _disk_full_hook(self, fault: dict) -> None:
        daemon = self.daemon
        if daemon is not None and daemon.alive():  # the hook needs a fresh start
            daemon.signal(signal.SIGTERM)
            self._ended(fault, daemon, {0}, stop_asked=True)
            fault["prelude"] = "SIGTERM"
        at = self.resume_step() + self.rng.randint(1, 3)
        fault["moment"], fault["moment_detail"] = "hook", {"step": at}
        for attempt in range(2):
            d = Daemon(self, {"MATHLORA_TEST_ENOSPC": str(at)}, fault["index"])
            self.daemon = d
            rc = d.wait()
            fault["exit_code" if attempt == 0 else "exit_code_full_restart"] = rc
            self.check_exit(d, rc, {75}, fault, stop_asked=False)

    def fill(self) -> int:
        """Fill the tmpfs: write the ballast until ENOSPC, in ever smaller pieces."""
        written = 0
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
                block = b"\0" * chunk
                while True:
                    try:
                        written += os.write(fd, block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def _fault_cli_stop(self, fault: dict) -> None:
        daemon = self._start_for(fault)
        if not self.reach(fault, daemon):
            return self._exited_early(fault, daemon)
        answer = self._cli_at_moment("stop", fault, daemon)
        if answer["rc"] == 0:
            self._ended(fault, daemon, {0}, stop_asked=True)
            self._check_acted(answer, fault, daemon)
        else:
            fault["applied"], fault["note"] = False, f"stop not accepted: {answer['said'][:120]}"

    def _fault_cli_pause_resume(self, fault: dict, then: str = "resume") -> None:
        daemon = self._start_for(fault)
        if not self.reach(fault, daemon):
            return self._exited_early(fault, daemon)
        asked = len(self.log.refresh())
        answer = self._cli_at_moment("pause", fault, daemon)
        if answer["rc"] != 0:
            fault["applied"], fault["note"] = False, f"pause not accepted: {answer['said'][:120]}"
            return
        if not self._check_acted(answer, fault, daemon):
            return
        if not self.wait_for(lambda: any(e.get("event") == "daemon.paused" for e in self.log.since(asked))
                             or daemon.finished(), daemon, 60):
            if daemon.alive():
                self.defect("no daemon.paused within 60 s of an acted-on pause", fault, daemon)
        time.sleep(self.rng.uniform(0.1, 1.5))
        second = self.cli(then, fault, daemon)
        if then == "stop":
            if second["rc"] == 0:
                self._ended(fault, daemon, {0}, stop_asked=True)
                self._check_acted(second, fault, daemon)
            else:
                self.defect("`stop` of a paused daemon not accepted", fault, daemon, cli=second)
            return
        if second["rc"] != 0:
            self.defect("`resume` of a paused daemon not accepted", fault, daemon, cli=second)
            return
        if self._check_acted(second, fault, daemon):
            have = len(daemon.steps())
            if not self.wait_for(lambda: len(daemon.steps()) > have or daemon.finished(), daemon, 60):
                self.defect("no training step within 60 s of an acted-on resume", fault, daemon)

    def _fault_cli_pause_stop(self, fault: dict) -> None:
        self._fault_cli_pause_resume(fault, then="stop")

    def _cli_at_moment(self, command: str, fault: dict, daemon: Daemon) -> dict:
        """Send the CLI command now; at a hold point the daemon is released while the CLI
        waits (its watcher acknowledges from another thread)."""
        if "hold" not in fault or fault["moment"].endswith("_missed"):
            return self.cli(command, fault, daemon)
        import threading

        releaser = threading.Thread(target=self.release, args=(fault,))
        releaser.start()
        try:
            return self.cli(command, fault, daemon)
        finally:
            releaser.join()

    def _check_acted(self, answer: dict, fault: dict, daemon: Daemon) -> bool:
        ok = self.acted(answer, daemon)
        answer["acted"] = ok
        if not ok:
            self.defect(f"`{answer['command']}` answered accepted (id {answer['id']}) but no "
                        f"control.{answer['command']} event with that id followed", fault, daemon, cli=answer)
        return ok

    def _exited_early(self, fault: dict, daemon: Daemon) -> None:
        """The daemon exited before the moment came (the run finished, or a defect)."""
        rc = daemon.wait(30)
        fault["exit_code"], fault["applied"] = rc, False
        fault["note"] = "the daemon exited before the moment" + (" (run finished)" if daemon.finished() else "")
        self.release(fault, after=0)
        self.check_exit(daemon, rc, {0}, fault, stop_asked=False)

    # -- the whole soak ----------------------------------------------------------------------
    def soak(self) -> None:
        self.torn = []
        for index, kind in enumerate(self.plan(self.args.faults)):
            if self.run_finished():
                self.faults.append({"index": index, "kind": kind, "moment": None, "applied": False,
                                    "note": "the run had finished (raise --steps)"})
                continue
            fault = self.apply(index, kind)
            line = (f"[{index + 1:3d}/{self.args.faults}] {kind:18s} {str(fault['moment']):12s} "
                    f"exit {str(fault.get('exit_code')):>4s}  {fault['seconds']:6.2f} s  "
                    f"step {max([e['step'] for e in self.log.refresh() if e.get('event') == 'train.step'] or [0])}"
                    f"{'' if fault['applied'] else '  (' + fault.get('note', '') + ')'}")
            print(line, flush=True)
        self.finish()

    def check_torn(self) -> None:
        """Every torn checkpoint must have been logged as `checkpoint.rejected` by a later
        start (a start resumes only after looking at the newest checkpoint)."""
        events = self.log.refresh()
        for fault in self.torn:
            t = fault["torn"]
            rejected = [e for e in events[t["log_index"]:] if e.get("event") == "checkpoint.rejected"
                        and Path(str(e.get("path", ""))).name == t["checkpoint"]]
            fault["rejected_logged"] = bool(rejected)
            if rejected:
                fault["rejected_why"] = rejected[0].get("why")
            elif not any(f["kind"] == "disk_full" and f["index"] > fault["index"] for f in self.faults):
                self.defect(f"torn checkpoint {t['checkpoint']} ({t['file']} {t['mode']}) was never logged as "
                            "checkpoint.rejected", fault)

    def finish(self) -> None:
        """Start the daemon until the run finishes (no more faults)."""
        if self.daemon is not None and self.daemon.alive():
            rc = self.daemon.wait(WAIT_S + self.total_steps * (self.step_s + self.eval_s) * 4)
            self.check_exit(self.daemon, rc, {0}, None, stop_asked=False)
        for _ in range(3):
            if self.run_finished():
                break
            final = Daemon(self, None, None)
            self.daemon = final
            rc = final.wait(WAIT_S + self.total_steps * (self.step_s + self.eval_s) * 4)
            self.check_exit(final, rc, {0}, None, stop_asked=False)
        self.check_torn()
        # A start after the finish must answer at once and change nothing.
        after = Daemon(self, None, None)
        self.check_exit(after, after.wait(), {0}, None, stop_asked=True)

    # -- the verdict -------------------------------------------------------------------------
    def verdict(self) -> dict:
        events = self.log.refresh()
        steps = [e for e in events if e.get("event") == "train.step"]
        last = {}
        for e in steps:
            last[e["step"]] = e["loss"]
        ref = self.reference["losses"]
        missing = sorted(set(ref) - set(last))
        differing_last = sorted(s for s in last if s in ref and last[s] != ref[s])
        differing_any = sorted({e["step"] for e in steps if e["step"] in ref and e["loss"] != ref[e["step"]]})
        adapters = sha(self.run / "adapters" / "adapters.safetensors")
        status = subprocess.run([sys.executable, "-m", "mathlora_daemon", "status", "--json", "--run-dir",
                                 str(self.run)], capture_output=True, text=True, env=daemon_env(self.state_dir),
                                timeout=120)
        try:
            state = json.loads(status.stdout).get("state")
        except ValueError:
            state = None
        verify = subprocess.run([sys.executable, "-m", "mathlora_daemon", "checkpoints", "verify", "--run-dir",
                                 str(self.run)], capture_output=True, text=True, env=daemon_env(self.state_dir),
                                timeout=120)
        leftovers = [p.name for p in (self.run / "checkpoints").iterdir() if p.name.startswith(".tmp-")] \
            if (self.run / "checkpoints").is_dir() else []
        acted_ids = {str(e.get("id")) for e in events if str(e.get("event", "")).startswith("control.")}
        never_acted = [a for a in self.accepted if not any(i.startswith(a["id"] or "\0") for i in acted_ids)]
        checks = {
            "adapters_identical": adapters == self.reference["adapters"],
            "adapters_sha256": adapters, "reference_sha256": self.reference["adapters"],
            "steps_logged": len(last), "total_steps": self.total_steps, "missing_steps": missing,
            "losses_identical_last": not missing and not differing_last, "differing_last": differing_last,
            "losses_identical_every_occurrence": not differing_any, "differing_any": differing_any,
            "redone_steps": len(steps) - len(last),
            "status_state": state, "status_ok": state == "finished",
            "checkpoints_verify_rc": verify.returncode, "tmp_leftovers": leftovers,
            "accepted_requests": len(self.accepted), "accepted_never_acted": [a["id"] for a in never_acted],
        }
        checks["adapters_tensors_identical"] = tensors_equal(self.run / "adapters" / "adapters.safetensors",
                                                             self.workdir / "reference" / "adapters" /
                                                             "adapters.safetensors")
        now = source_hashes()
        changed = sorted(f for f in set(now) | set(self.sources) if now.get(f) != self.sources.get(f))
        checks["sources_changed_during_soak"] = changed
        if not checks["adapters_identical"]:
            self.defect("final adapters differ from the uninterrupted run's (file bytes)", sha256=adapters,
                        reference=self.reference["adapters"], tensors_identical=checks["adapters_tensors_identical"],
                        sources_changed_during_soak=changed)
        if missing:
            self.defect(f"steps never logged: {missing[:20]}")
        if differing_last:
            self.defect(f"per-step losses differ (last occurrence) at steps {differing_last[:20]}",
                        examples={s: [last[s], ref[s]] for s in differing_last[:5]})
        if differing_any and not differing_last:
            self.defect(f"an earlier logged loss differs from the reference at steps {differing_any[:20]}")
        if state != "finished":
            self.defect(f"status says {state!r} at the end, not 'finished'", status=status.stdout[-1500:],
                        stderr=status.stderr[-800:])
        if verify.returncode != 0:
            self.defect(f"checkpoints verify exited {verify.returncode}", output=verify.stdout[-1500:])
        if leftovers:
            self.defect(f"temporary checkpoint directories left at the end: {leftovers}")
        for a in never_acted:
            if not any(d.get("cli", {}).get("id") == a["id"] for d in self.defects):
                self.defect(f"accepted `{a['command']}` (id {a['id']}) never acted on", cli=a)
        return checks


def _brief(e: dict) -> dict:
    keep = ("ts", "event", "step", "loss", "reason", "exit_code", "id", "signal", "why", "path", "error", "errno",
            "state", "from_step", "val_loss")
    return {k: e[k] for k in keep if k in e}


def summarize(soak: Soak, checks: dict, seconds: float) -> dict:
    counts, applied, moments, exits = {}, {}, {}, {}
    for f in soak.faults:
        counts[f["kind"]] = counts.get(f["kind"], 0) + 1
        applied[f["kind"]] = applied.get(f["kind"], 0) + bool(f["applied"])
        moments[str(f["moment"])] = moments.get(str(f["moment"]), 0) + 1
        exits[str(f.get("exit_code"))] = exits.get(str(f.get("exit_code")), 0) + 1
    ok = not soak.defects
    return {
        "verdict": "pass" if ok else "fail",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seed": soak.args.seed, "faults_requested": soak.args.faults, "faults_applied": sum(applied.values()),
        "kinds": counts, "applied_by_kind": applied, "moments": moments, "fault_exit_codes": exits,
        "starts": len(soak.starts), "seconds": round(seconds, 1), "disk": soak.disk_mode,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "run": {"total_steps": soak.total_steps, "val_rows": soak.args.val_rows, "checkpoint_every_steps": 1,
                "lora_dropout": 0.1, "step_s": soak.step_s, "eval_s": soak.eval_s},
        "reference": {k: v for k, v in soak.reference.items() if k != "losses"},
        "checks": checks, "defects": soak.defects, "faults": soak.faults, "start_records": soak.starts,
        "workdir": str(soak.workdir),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=int, default=24, help="how many faults (every kind at least once from 12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0,
                   help="training steps of the run (rounded up to an epoch of 8; default max(40, 2 x faults + 16))")
    p.add_argument("--val-rows", type=int, default=16, help="held-out rows: the validation pass at every checkpoint")
    p.add_argument("--disk", choices=("auto", "tmpfs", "hook"), default="auto",
                   help="tmpfs: a real full disk (root); hook: MATHLORA_TEST_ENOSPC; auto: tmpfs when it mounts")
    p.add_argument("--disk-mb", type=int, default=16, help="size of the tmpfs holding the run directory")
    p.add_argument("--startup-s", type=float, default=4.0, help="the `startup` moment: a delay in [0, this]")
    p.add_argument("--stop-pause-s", type=float, default=3.0, help="longest SIGSTOP before SIGCONT")
    p.add_argument("--workdir", help="where to work (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory even when no defect was found")
    p.add_argument("--out", help="write the JSON report here")
    args = p.parse_args(argv)
    if args.faults < 0:
        p.error("--faults must be >= 0")
    args.steps = args.steps or max(40, 2 * args.faults + 16)

    started = time.monotonic()
    soak = Soak(args)
    soak.mount()
    try:
        ref = soak.prepare()
        print(f"# run: {soak.total_steps} steps, checkpoint + validation every step ({soak.eval_s:.3f} s), "
              f"disk {soak.disk_mode}; reference {ref['seconds']} s, adapters {ref['adapters'][:16]}", flush=True)
        soak.soak()
        checks = soak.verdict()
    finally:
        if soak.daemon is not None and soak.daemon.alive():
            soak.daemon.kill_hard()
        evidence = soak.workdir / "evidence"
        if soak.run.is_dir():  # the run directory outlives the tmpfs (a defect's evidence)
            shutil.rmtree(evidence, ignore_errors=True)
            shutil.copytree(soak.run, evidence, ignore=shutil.ignore_patterns("mlx_model", "cache", "data"))
        soak.unmount()
    report = summarize(soak, checks, time.monotonic() - started)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n# {report['verdict'].upper()}: {report['faults_applied']}/{args.faults} faults applied, "
          f"{report['starts']} starts, {report['seconds']} s, disk {soak.disk_mode}")
    print("# kinds: " + ", ".join(f"{k} {report['applied_by_kind'][k]}/{n}" for k, n in sorted(report["kinds"].items())))
    print("# moments: " + ", ".join(f"{k} {n}" for k, n in sorted(report["moments"].items())))
    print(f"# adapters identical: {checks['adapters_identical']}; losses identical (last): "
          f"{checks['losses_identical_last']}, every occurrence: {checks['losses_identical_every_occurrence']} "
          f"({checks['redone_steps']} steps re-done); status: {checks['status_state']}; "
          f"accepted control requests: {checks['accepted_requests']}")
    if checks.get("sources_changed_during_soak"):
        print(f"# WARNING: the daemon's sources changed during the soak (the reference ran older code): "
              f"{', '.join(checks['sources_changed_during_soak'])}")
    for d in soak.defects:
        where = f"fault {d['fault']} {d['kind']}@{d['moment']}: " if "fault" in d else ""
        print(f"# DEFECT {where}{d['what']}")
    if report["verdict"] == "pass" and not args.keep:
        shutil.rmtree(soak.workdir, ignore_errors=True)
    else:
        print(f"# work directory kept: {soak.workdir}")
    return 0 if report["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
