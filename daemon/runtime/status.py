"""What a run is doing (or did last), fast, whether it runs or not: the data of the
``status`` command (its front-end, text or JSON, is cli/watch.py).

It reads the heartbeat (``state/status.json``, written by runtime/heartbeat.py),
``state/failure.json`` and the ``daemon.lock`` probe and says what the run is doing,
including whether a daemon died without saying goodbye.

Fields the daemon puts in status.json (every one optional to a reader):

=====================  ===========================================================
pid, run, version      the daemon's process id, the run's name, the package version
state                  running | paused | waiting | stopped | finished |
                       budget_exhausted | failed
phase                  loading | preparing | training | checkpointing | paused |
                       waiting | done
reason                 why paused / waiting / stopped / failed (free text)
step, total_steps      global optimizer step and the planned total
epoch                  current epoch (0-based)
loss                   the last step's loss; recent_mean_loss: mean of the last 10 steps
tok_per_s, step_s      recent throughput: tokens per second, seconds per step
budget_used_s          training seconds spent across all restarts;
budget_total_s,        the budget and what is left of it (left is derived from
budget_left_s          total - used when the daemon does not set it)
window, window_ends    the schedule window ("22:00-07:00") and its end (ISO, local)
last_checkpoint_step,  the newest checkpoint's step and when it was saved (UTC ISO)
last_checkpoint_at
memory                 {mem_active_gb, mem_peak_gb, rss_gb, sys_available_gb,
                       swap_used_gb}
batch_split            each micro-batch cut into this many after a step ran out of memory (1: never)
log_path               the JSON log (``<run>/logs/daemon.jsonl``)
started_at             when this daemon process started (UTC ISO)
world_size             ranks training together (1: one process; mlx.launch: more)
updated_at,            when the file was written (UTC ISO, and Unix seconds); set
updated_unix           by :meth:`Heartbeat.write`
=====================  ===========================================================

``read_status`` adds the derived state (``not_started`` and ``crashed`` exist only
there), ``heartbeat_age_s``, ``stale``, ``suspended`` (the live daemon's process is stopped:
SIGSTOP, Ctrl-Z; read through the injected ``process_status``), ``crashed_reason``, ``eta_s``, ``eta_at``,
``checkpoint_age_s``, ``log_path``, ``run_dir`` and ``service`` (the launchd agent or
systemd unit of this run: ``{manager, label, installed, loaded, path}``, from the
injected ``service_probe``, service/install.py's ``service_status`` when the CLI asks;
loaded is None when it cannot be told).

No MLX, numpy or structlog import here: ``status`` must answer in well under a second.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from mathlora_checkpoints.store import newest_checkpoint, read_json_object
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime import humanize
from mathlora_daemon.runtime.heartbeat import json_int, json_number, utc_iso
from mathlora_daemon.runtime.lock import probe_lock
from mathlora_daemon.runtime.report import read_report

LIVE_STATES = ("running", "paused", "waiting")
TERMINAL_STATES = ("stopped", "finished", "budget_exhausted", "failed")
STALE_AFTER_S = 120.0
# Why a run stopped after a second Ctrl-C: the daemon's last word and, when its status could
# not be written, what `status` derives from the crash guard's record.
SECOND_CTRL_C = "interrupted by a second Ctrl-C (exit 130); the next start resumes from the newest checkpoint"
HEARTBEAT_EVERY_S = 10  # what the daemon's heartbeat thread is started with (training/loop.py)
SLOW_HEARTBEAT_S = 25.0  # older than this (but not stale): worth a hint
SUSPENDED_PROCESS_STATES = ("stopped", "tracing-stop")  # psutil's names for SIGSTOP / Ctrl-Z / ptrace


def read_status(run: RunDir, now: float | None = None,
                probe: Callable[[RunDir], tuple[bool, int | None]] = probe_lock,
                pid_alive: Callable[[int], bool] = psutil.pid_exists,
                stale_after_s: float = STALE_AFTER_S,
                service_probe: Callable[[RunDir], dict | None] | None = None,
                process_status: Callable[[int], str | None] | None = None) -> dict[str, Any]:
    """Given a run directory, return the ``status`` answer: the heartbeat's fields with
    the derived ``state`` and the derived fields listed in the module docstring. Never
    raises for a missing or damaged run directory (an empty one is ``not_started``).

    The lock is the authority on liveness: held -> the heartbeat's state (flagged
    ``stale`` when its heartbeat is older than ``stale_after_s``); free -> a recorded
    failure, else the final state the daemon wrote, else ``crashed``.
    """
    now = time.time() if now is None else float(now)

    # Probe, read, probe again: a daemon starting or exiting between the two reads
    # would otherwise be reported as crashed (lock free, file says running).
    for _ in range(3):
        lock_before = _safe_probe(probe, run)
        heartbeat = read_json_object(run.status_file)
        failure = read_json_object(run.failure_file)
        lock_after = _safe_probe(probe, run)
        if lock_before == lock_after:
            break
    held, lock_pid = lock_after

    status: dict[str, Any] = dict(heartbeat or {})
    file_state = status.get("state") if isinstance(status.get("state"), str) else None
    file_pid = json_int(status.get("pid"))
    updated = json_number(status.get("updated_unix"))
    age = max(0.0, now - updated) if updated is not None else None
    if age is not None:
        status["heartbeat_age_s"] = round(age, 1)
    stale = age is not None and age > stale_after_s

    if held is None:
        # The lock cannot be probed (odd file system, permissions): fall back to the pid
        # and the heartbeat's freshness.
        held = file_pid is not None and _alive(pid_alive, file_pid) and not stale
        lock_pid = file_pid if held else None

    if held:
        ours = heartbeat is not None and (lock_pid is None or lock_pid == file_pid)
        if ours:
            status["state"] = file_state or "running"
            if stale:
                status["stale"] = True  # alive but silent: a hung daemon
        else:
            # A new daemon holds the lock and has not written its first heartbeat yet;
            # the rest of the file is the previous daemon's last word (still the progress).
            status["state"] = "running"
            status["phase"] = "starting"
            status.pop("reason", None)
        if lock_pid is not None:
            status["pid"] = lock_pid
    elif failure is not None:
        status["state"] = "failed"
        status["reason"] = str(failure.get("reason") or "recorded failure")
        status["failure"] = failure
    elif heartbeat is None and run.status_file.exists():
        # Damaged (a disk error, a hand edit): say so rather than "not started".
        status["state"] = "unknown"
        status["reason"] = (f"{run.status_file} cannot be read (not a JSON object); the daemon rewrites it at its "
                            "next start, and the checkpoints below are unaffected")
    elif heartbeat is None:
        status["state"] = "not_started"
    elif file_state in TERMINAL_STATES:
        status["state"] = file_state
    elif (ended := _recorded_exit(run, file_pid)) is not None:
        # It exited on purpose but its final status could not be written (a full disk).
        status["state"], status["reason"] = ended
    else:
        # The file says the daemon is alive, but nobody holds the lock: it died without
        # writing a final state (SIGKILL, power loss, crash).
        status["state"] = "crashed"
        status["crashed_reason"] = _crashed_reason(file_pid, age, pid_alive)

    saved = read_report(run)
    if saved is not None:
        # The morning report outlives the heartbeat: later starts replace status.json.
        status["report_path"] = str(run.report_file)
        status["last_end"] = {k: saved.get(k) for k in ("state", "reason", "step", "ended_unix")}
        if not isinstance(status.get("report"), dict) and isinstance(saved.get("report"), dict):
            status["report"] = saved["report"]

    _add_checkpoint(status, run, now)
    _add_suspended(status, process_status or read_process_status)
    _add_eta(status, now)
    total, used = json_number(status.get("budget_total_s")), json_number(status.get("budget_used_s"))
    if total is not None and used is not None and json_number(status.get("budget_left_s")) is None:
        status["budget_left_s"] = max(0.0, total - used)
    if not isinstance(status.get("log_path"), str):
        status["log_path"] = str(run.log_file)
    status["run_dir"] = str(run.root)
    # Whether launchd/systemd will (re)start this run; a probe only when its file exists.
    service = service_probe(run) if service_probe is not None else None
    if service is not None:
        status["service"] = service
    return status


def _recorded_exit(run: RunDir, pid: int | None) -> tuple[str, str] | None:
    """(state, reason) when the crash guard recorded that this daemon exited with 75 or
    130 (its own choice), though its heartbeat still says running; else None."""
    from mathlora_daemon.runtime.crashguard import read_start_record

    record = read_start_record(run)
    if record is None or pid is None or record.pid != pid or not record.clean_exit:
        return None
    if record.exit_code == 75:
        return "stopped", ("temporary failure (exit 75; launchd and systemd start it again); "
                           "`mathlora-daemon logs --level error` says why")
    if record.exit_code == 130:
        return "stopped", SECOND_CTRL_C
    return None


def _safe_probe(probe, run: RunDir) -> tuple[bool | None, int | None]:
    try:
        held, pid = probe(run)
    except OSError:
        return None, None
    return bool(held), pid


def _alive(pid_alive, pid: int) -> bool:
    if pid <= 0:  # pid 0 would mean "our process group" to kill(); never a daemon
        return False
    try:
        return bool(pid_alive(pid))
    except Exception:  # noqa: BLE001 - a liveness probe that fails says nothing
        return False


def _crashed_reason(pid: int | None, age: float | None, pid_alive) -> str:
    who = f"process {pid}" if pid is not None else "the daemon"
    if pid is not None and _alive(pid_alive, pid):
        # The pid exists but does not hold the lock: reused by another process, or a
        # daemon that lost its lock file.
        what = f"{who} no longer holds the lock"
    else:
        what = f"{who} is gone"
    when = f"last heartbeat {_duration(age)} ago" if age is not None else "no heartbeat time"
    return f"{what}; {when}"


def _add_checkpoint(status: dict, run: RunDir, now: float) -> None:
    if json_int(status.get("last_checkpoint_step")) is None:
        newest = newest_checkpoint(run.checkpoints)
        if newest is not None:
            status["last_checkpoint_step"] = newest[0]
            if newest[1] is not None:
                status["last_checkpoint_at"] = utc_iso(newest[1])
    at = _parse_iso(status.get("last_checkpoint_at"))
    if at is not None:
        status["checkpoint_age_s"] = round(max(0.0, now - at), 1)


def read_process_status(pid: int) -> str | None:
    """Given a pid, return its scheduler state as psutil names it ("running",
    "sleeping", "stopped", "tracing-stop", ...), or None when it cannot be read."""
    try:
        return psutil.Process(pid).status()
    except (psutil.Error, OSError):
        return None


def _add_suspended(status: dict, process_status: Callable[[int], str | None]) -> None:
    """Flag a live daemon whose process is stopped (SIGSTOP, Ctrl-Z, a debugger): it
    holds the lock and looks alive, but neither trains nor writes its heartbeat."""
    pid = json_int(status.get("pid"))
    if status.get("state") not in LIVE_STATES or pid is None or pid <= 0:
        return
    try:
        state = process_status(pid)
    except Exception:  # noqa: BLE001 - a probe that fails says nothing
        return
    if state in SUSPENDED_PROCESS_STATES:
        status["suspended"] = True


def _add_eta(status: dict, now: float) -> None:
    # tok/s alone cannot give an ETA (tokens per step vary); seconds per step can.
    # A run that has ended (stopped, finished, budget exhausted, failed) or whose budget
    # is spent trains no more steps this start: no eta, rather than a promise.
    step, total = json_int(status.get("step")), json_int(status.get("total_steps"))
    step_s = json_number(status.get("step_s"))
    if status.get("state") in TERMINAL_STATES or None in (step, total, step_s) or step_s <= 0:
        return
    left = json_number(status.get("budget_left_s"))
    budget_total, used = json_number(status.get("budget_total_s")), json_number(status.get("budget_used_s"))
    if left is None and budget_total is not None and used is not None:
        left = budget_total - used
    if left is not None and left <= 0:
        return
    eta = max(0, total - step) * step_s
    status["eta_s"] = round(eta, 1)
    if status.get("state") == "running" and not status.get("stale") and not status.get("suspended"):
        status["eta_at"] = _local_iso(now + eta)


# --------------------------------------------------------------------------- rendering


def render_status(status: dict[str, Any]) -> str:
    """Given a ``read_status`` answer, return a short human table (one ``label value``
    per line; missing fields are left out, never shown as None)."""
    rows: list[tuple[str, str]] = []
    state = str(status.get("state") or "unknown")
    pid, phase = json_int(status.get("pid")), status.get("phase")

    head = state.replace("_", " ")
    if state in LIVE_STATES:
        if pid is not None:
            head += f" (pid {pid})"
        if phase:
            head += f", phase {phase}"
    age = json_number(status.get("heartbeat_age_s"))
    if status.get("suspended"):
        head += f", SUSPENDED (SIGSTOP or Ctrl-Z; `kill -CONT {pid}` resumes it)"
    elif status.get("stale"):
        head += f", NO HEARTBEAT FOR {_duration(age)} (hung?)"
    elif state in LIVE_STATES and age is not None and age > SLOW_HEARTBEAT_S:
        head += f", last heartbeat {_duration(age)} ago; written every {HEARTBEAT_EVERY_S} s: busy or suspended?"
    rows.append(("state", head))

    if state == "crashed" and status.get("crashed_reason"):
        rows.append(("why", str(status["crashed_reason"])))
    elif status.get("reason"):
        rows.append(("why" if state == "failed" else "reason", str(status["reason"])))
    if state == "not_started":
        rows.append(("run dir", str(status.get("run_dir", ""))))

    step, total = json_int(status.get("step")), json_int(status.get("total_steps"))
    epoch = json_int(status.get("epoch"))
    if step is not None:
        text = f"step {step}"
        if total:
            text += f" / {total} ({100.0 * step / total:.1f}%)"
        if epoch is not None:
            text += f", epoch {epoch}"
        rows.append(("progress", text))

    loss, mean = json_number(status.get("loss")), json_number(status.get("recent_mean_loss"))
    if loss is not None or mean is not None:
        parts = [f"{loss:.3f}"] if loss is not None else []
        if mean is not None:
            text = f"mean of the last 10 steps {mean:.3f}"
            parts.append(f"({text})" if parts else text)
        rows.append(("loss", " ".join(parts)))

    val, base_val = json_number(status.get("val_loss")), json_number(status.get("base_val_loss"))
    best_val, best_step = json_number(status.get("best_val_loss")), json_int(status.get("best_val_step"))
    if val is not None and not isinstance(status.get("report"), dict):
        text = f"{val:.4f} at step {json_int(status.get('val_step'))}"
        extra = [f"best {best_val:.4f} at step {best_step}"] if best_val is not None else []
        extra += [f"base model {base_val:.4f}"] if base_val is not None else []
        rows.append(("val loss", text + (f" ({'; '.join(extra)})" if extra else "")))

    if isinstance(status.get("stage"), str):  # train.method = "sft+grpo"
        rows.append(("stage", status["stage"]))

    rl = status.get("rl") if isinstance(status.get("rl"), dict) else None
    if rl and json_number(rl.get("reward_mean")) is not None:
        rows.append(("grpo", f"reward {rl['reward_mean']:.3f} (std {json_number(rl.get('reward_std')) or 0:.3f}), "
                             f"sample accuracy {100 * (json_number(rl.get('sample_accuracy')) or 0):.1f}%, "
                             f"groups without signal {100 * (json_number(rl.get('zero_advantage_share')) or 0):.0f}%, "
                             f"{json_number(rl.get('completion_tokens_mean')) or 0:.0f} tokens a completion"))

    world = json_int(status.get("world_size"))
    if world is not None and state != "not_started":
        rows.append(("world", "1 process" if world == 1 else
                     f"{world} ranks (mlx.launch; rank 0 reports, speed is the whole job's)"))

    tok_s, step_s = json_number(status.get("tok_per_s")), json_number(status.get("step_s"))
    speed = []
    if tok_s is not None:
        speed.append(f"{tok_s:,.0f} tok/s")
    if step_s is not None:
        speed.append(f"{step_s:.1f} s/step" if step_s >= 1 else f"{step_s:.2f} s/step")
    if speed:
        rows.append(("speed", ", ".join(speed)))

    used, left, total_b = (json_number(status.get(k)) for k in ("budget_used_s", "budget_left_s", "budget_total_s"))
    budget = []
    if used is not None:
        budget.append(f"used {_duration(used)}")
    if left is not None:
        budget.append(f"left {_duration(left)}")
    if budget or total_b is not None:
        text = ", ".join(budget)
        if total_b is not None:
            text = f"{text} of {_duration(total_b)}" if text else _duration(total_b)
        rows.append(("budget", text))

    window, window_ends = status.get("window"), _parse_iso(status.get("window_ends"))
    if window or window_ends is not None:
        parts = [str(window)] if window else []
        if window_ends is not None:
            parts.append(f"ends {_clock_time(window_ends, json_number(status.get('updated_unix')))}")
        rows.append(("window", ", ".join(parts)))

    eta_s, eta_at = json_number(status.get("eta_s")), _parse_iso(status.get("eta_at"))
    if eta_s is not None:
        if eta_at is not None:
            text = f"{_clock_time(eta_at, eta_at - eta_s)} (in {_duration(eta_s)})"
        else:
            text = f"{_duration(eta_s)} of training left"
        if left is not None and eta_s > left:
            text += "; the budget runs out first"
        rows.append(("eta", text))

    ck_step, ck_age = json_int(status.get("last_checkpoint_step")), json_number(status.get("checkpoint_age_s"))
    if ck_step is not None:
        text = f"step {ck_step}"
        if ck_age is not None:
            text += f", {_duration(ck_age)} ago"
        rows.append(("checkpoint", text))

    memory = status.get("memory") if isinstance(status.get("memory"), dict) else {}
    mem = []
    for key, label in (("mem_active_gb", "active"), ("mem_peak_gb", "peak"), ("rss_gb", "rss"),
                       ("sys_available_gb", "available"), ("swap_used_gb", "swap")):
        value = json_number(memory.get(key))
        if value is not None and not (key == "swap_used_gb" and value == 0):
            mem.append(f"{label} {value:.1f} GB")
    split = json_number(status.get("batch_split"))
    if split is not None and split > 1:  # training/oom.py: a step ran out of memory
        mem.append(f"micro-batches split {int(split)}x after running out of memory")
    if mem:
        rows.append(("memory", ", ".join(mem)))

    if isinstance(status.get("report"), dict) and state in TERMINAL_STATES:
        rows += [(line[:10].strip(), line[11:]) for line in report_lines(status["report"])]

    hb_age = json_number(status.get("heartbeat_age_s"))
    if hb_age is not None and state in LIVE_STATES:
        rows.append(("heartbeat", f"{_duration(hb_age)} ago"))
    if status.get("log_path") and state != "not_started":
        rows.append(("log", str(status["log_path"])))
    if isinstance(status.get("service"), dict):
        rows.append(("service", _service_text(status["service"])))
    return "\n".join(f"{label:<10} {value}".rstrip() for label, value in rows) + "\n"


def report_lines(report: dict) -> list[str]:
    """The morning report (what a finished run did) as `label value` lines: the
    adapters, how they were chosen, validation loss against the base model's, the final
    eval, the training loss of the whole run, and how to try them."""
    rows = []
    adapters = report.get("adapters")
    if adapters:
        selected, steps = json_int(report.get("selected_step")), json_int(report.get("steps"))
        rule = report.get("selected_rule") or ("lowest validation loss" if selected != steps else "the last")
        chosen = f"step {selected} of the {steps} trained, {'the last' if rule == 'last' else rule}"
        rows.append(("adapters", f"{adapters} ({chosen})"))
    stages = report.get("stages")
    sft = stages.get("sft") if isinstance(stages, dict) else None
    if isinstance(sft, dict):  # train.method = "sft+grpo": what the first stage did
        text = f"{json_int(sft.get('steps'))} SFT steps, then GRPO from {sft.get('adapters')}"
        sft_best, sft_base = json_number(sft.get("best_val_loss")), json_number(sft.get("base_val_loss"))
        if sft_best is not None and sft_base is not None:
            text += f" (SFT val loss {sft_base:.4f} -> {sft_best:.4f})"
        rows.append(("stages", text))
    best, base = json_number(report.get("best_val_loss")), json_number(report.get("base_val_loss"))
    best_acc, base_acc = json_number(report.get("best_val_accuracy")), json_number(report.get("base_val_accuracy"))
    if best_acc is not None:  # GRPO: selected by greedy accuracy on the validation problems
        text = f"{100 * best_acc:.1f}% at step {json_int(report.get('best_val_step'))}"
        if base_acc is not None:
            text += f" vs {100 * base_acc:.1f}% at step 0 (where GRPO started)"
        rows.append(("val acc", text))
        if warning := validation_warning(report):
            rows.append(("warning", warning))
        first_r, recent_r = json_number(report.get("first_reward")), json_number(report.get("recent_reward"))
        if first_r is not None and recent_r is not None:
            rows.append(("reward", f"{first_r:.3f} at step 1 -> {recent_r:.3f} (mean of the last 10 steps)"))
        best = None
    if best is not None:
        text = f"{best:.4f} at step {json_int(report.get('best_val_step'))}"
        if base is not None:
            text += f" vs {base:.4f} for the base model ({100 * (best - base) / base:+.1f}%)"
        rows.append(("val loss", text))
        if warning := validation_warning(report):
            rows.append(("warning", warning))
    first, recent = json_number(report.get("first_loss")), json_number(report.get("recent_loss"))
    if first is not None and recent is not None:
        rows.append(("train loss", f"{first:.4f} at step 1 -> {recent:.4f} (mean of the last 10 steps)"))
    final = report.get("final_eval")
    if isinstance(final, dict) and isinstance(final.get("base"), dict) and isinstance(final.get("adapters"), dict):
        b, a = final["base"], final["adapters"]
        rows.append(("eval", f"{json_int(final.get('n'))} validation problems: accuracy "
                             f"{100 * b['accuracy']:.1f}% -> {100 * a['accuracy']:.1f}%, format "
                             f"{100 * b['format_compliance']:.1f}% -> {100 * a['format_compliance']:.1f}% "
                             "(base -> adapters)"))
    if report.get("final_eval_pending"):
        rows.append(("eval", "cut short by a stop; the next start answers the problems (and only that)"))
    if adapters:
        run_dir = report.get("run_dir") or str(Path(adapters).parent)
        where = f"--run-dir {shlex.quote(run_dir)}"
        if Path(adapters) != Path(run_dir) / RunDir(Path()).adapters:  # a --debug run's adapters
            where += f" --adapter-path {shlex.quote(str(adapters))}"
        rows.append(("try", f"mathlora-daemon generate {where} --prompt \"...\"  "
                            f"(or: mathlora-daemon eval {where})"))
    return [f"{label:<10} {value}" for label, value in rows]


def validation_warning(report: dict) -> str | None:
    """The morning's warning when validation found no checkpoint better than where training
    started (the base model; for GRPO, its starting adapters), for status and the report page."""
    best_acc, base_acc = json_number(report.get("best_val_accuracy")), json_number(report.get("base_val_accuracy"))
    if best_acc is not None:  # GRPO: selected by greedy accuracy
        if base_acc is None or best_acc > base_acc:
            return None
        kept = ("adapters/ holds the adapters GRPO started from" if json_int(report.get("selected_step")) == 0
                else "the adapters GRPO started from may be better")
        return (f"no checkpoint beat the starting point on validation accuracy: {kept} (try a lower "
                "train.learning_rate or more steps)")
    best, base = json_number(report.get("best_val_loss")), json_number(report.get("base_val_loss"))
    if best is None or base is None or best < base:
        return None
    return ("no checkpoint beat the base model on validation loss: the adapters may be worse than no adapters "
            "(try a lower train.learning_rate; check the data)")


def _service_text(service: dict) -> str:
    """Given the ``service`` field, return e.g. ``launchd agent com.mathlora.daemon.x:
    installed, loaded``."""
    manager = service.get("manager")
    what = f"{manager} {'agent' if manager == 'launchd' else 'unit'} {service.get('label', '')}".rstrip()
    if service.get("other_run_dir"):
        return f"{what}: not installed for this run (taken by {service['other_run_dir']})"
    if not service.get("installed"):
        return f"{what}: not installed (mathlora-daemon install)"
    word = "loaded" if manager == "launchd" else "enabled"
    loaded = service.get("loaded")
    state = word if loaded is True else f"not {word}" if loaded is False else f"{word}: unknown (no answer)"
    return f"{what}: installed, {state}"


# --------------------------------------------------------------------------- helpers


def _local_iso(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _parse_iso(value: Any) -> float | None:
    """Given an ISO-8601 string (``Z`` or an offset; naive means local), return Unix
    seconds, else None. Python 3.10's fromisoformat does not accept ``Z``."""
    if not isinstance(value, str) or not value:
        return None
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _clock_time(t: float, reference: float | None) -> str:
    return humanize.local_time(t, reference)


def _duration(seconds: float | None) -> str:
    return humanize.duration(seconds)
