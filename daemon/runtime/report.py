"""The morning report as a durable file: `report.json` in the run directory.

The heartbeat (`state/status.json`) is what the daemon is doing now, and every start
replaces it. The report is what the run's last end left: the state it ended in
(finished, budget_exhausted, stopped, failed) and why, the step, where the adapters are
and which step they are, validation loss against the base model's, the final eval, the
budget. It is written at every end, atomically, and only an end writes it: a later
start, a `status` read or a restart never erases it (`status` shows it whenever the
heartbeat has none), and a start that fails before training keeps the figures of the
end before it.

`finished_already` lets a start of a run that has nothing left to do exit at once,
without loading the model: the report says finished (or budget_exhausted, with the
budget still spent), at the newest checkpoint's step, with the same training settings,
and no final eval pending (one cut short by a stop is run by the next start).

No MLX import here: `status` reads this module.
"""

from __future__ import annotations

import hashlib
import json
import time

from mathlora_checkpoints.fsio import atomic_write_text, ensure_private_dir
from mathlora_checkpoints.store import newest_checkpoint, read_json_object, step_dir_name, verify_checkpoint
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.heartbeat import jsonable

REPORT_STATES = ("finished", "budget_exhausted", "stopped", "failed")


def training_identity(cfg) -> str:
    """A hash of every setting but the daemon's own (budget, window, guards): when it
    changes (more epochs, another final_eval), a finished run may have work to do."""
    from mathlora_daemon.config import config_to_dict

    settings = {section: body for section, body in config_to_dict(cfg).items() if section != "daemon"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_report(run: RunDir, state: str, reason: str, step: int | None, report: dict | None, *,
                 identity: str | None = None, budget_used_s: float | None = None,
                 budget_total_s: float | None = None, now: float | None = None) -> dict:
    """Write the run's end atomically and return it. A `report` of None (a start that
    failed before training) keeps the figures of the previous end. Raise OSError when it
    cannot be written (the caller decides whether that matters)."""
    if state not in REPORT_STATES:
        raise ValueError(f"report state must be one of {REPORT_STATES}, got {state!r}")
    previous = read_report(run) or {}
    now = time.time() if now is None else now
    body = {
        "state": state, "reason": reason, "ended_unix": now,
        "step": step if step is not None else previous.get("step"),
        "report": report if report is not None else previous.get("report"),
        "identity": identity or previous.get("identity"),
        "budget_used_s": budget_used_s, "budget_total_s": budget_total_s,
        "run_dir": str(run.root),
    }
    ensure_private_dir(run.report_file.parent)
    atomic_write_text(run.report_file, json.dumps(jsonable(body), indent=2, sort_keys=True, allow_nan=False) + "\n")
    return body


def read_report(run: RunDir) -> dict | None:
    """The last end's report, or None when there is none or it cannot be read."""
    data = read_json_object(run.report_file)
    if data is None or data.get("state") not in REPORT_STATES:
        return None
    return data


def finished_already(run: RunDir, identity: str, budget_exhausted: bool) -> dict | None:
    """The report when this start has nothing to do (see the module docstring), else None."""
    report = read_report(run)
    if report is None or not isinstance(report.get("report"), dict) or report["report"].get("final_eval_pending"):
        return None
    if report["state"] == "finished":
        if report.get("identity") != identity:
            return None
    elif not (report["state"] == "budget_exhausted" and budget_exhausted):
        return None
    newest = newest_checkpoint(run.checkpoints)
    if newest is None or newest[0] != report.get("step") or not run.adapters.is_dir():
        return None  # the adapters of the newest step were never written (a kill at the end): finish them
    if verify_checkpoint(run.checkpoints / step_dir_name(newest[0])) is not None:
        return None  # damaged since: the full start names it and falls back (a LoRA checkpoint hashes in well under 1 s)
    return report


def pointer(report: dict, run: RunDir) -> str:
    """One line telling a user where the morning report and the adapters are."""
    import shlex

    body = report.get("report") or {}
    where = f"; adapters {body['adapters']}" if body.get("adapters") else ""
    return f"The morning report: `mathlora-daemon status --run-dir {shlex.quote(str(run.root))}`{where}"
