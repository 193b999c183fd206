"""The morning report as a page: `report.html` in the run directory.

`status` answers in a terminal and `report.json` is for scripts; the page is for a person
the morning after, in a browser, on a phone, in a mail: one self-contained HTML5 file
(inline CSS, no script, no external asset or URL; the loss plot is a data: URI), so it
opens from disk, offline, wherever it is copied. It holds what `status --json` says,
built from the status dict (never from status's text): the state and why, the adapters
and their step, validation loss (GRPO: accuracy) against the base model's, the final eval
before/after per kind, the budget, the starts, the checkpoints, and the loss /
validation / learning-rate plot of evaluation/plot.py.

It is rewritten atomically (0600) at every checkpoint and every end of the daemon, and by
`status --html`. A page that cannot be written never stops training: `Page.refresh` logs
`report.html.failed` and goes on. The plot comes from the `figures(run)` callable it
is given (evaluation/plot.py `page_figures`: the layers above draw it), and is redrawn at
most every PLOT_EVERY_S while the daemon trains. No MLX import here.
"""

from __future__ import annotations

import base64
import time
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from mathlora_checkpoints.fsio import atomic_write_text, ensure_private_dir
from mathlora_checkpoints.store import manifested_newest_first
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.heartbeat import json_int, json_number
from mathlora_daemon.runtime.humanize import duration
from mathlora_daemon.runtime.status import _parse_iso, read_status, validation_warning

PLOT_EVERY_S = 60.0  # while training; an end always redraws

CSS = """
body{font:15px/1.45 -apple-system,system-ui,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;max-width:58rem;
margin:1.5rem auto;padding:0 1rem}
h1{font-size:1.45rem;margin:0 0 .2rem}h2{font-size:1.1rem;margin:1.6rem 0 .4rem}
.state{display:inline-block;padding:.05rem .5rem;border-radius:.6rem;background:#e8e8ed;font-size:1rem}
.finished{background:#d3f5dc}.failed,.crashed{background:#fbd5d5}.budget_exhausted,.stopped{background:#fdf0c6}
.running{background:#d6e8fc}
p.meta{color:#6e6e73;margin:.2rem 0}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #e5e5ea;
vertical-align:top}th{font-weight:600;color:#3a3a3c;width:13rem}thead th{width:auto;border-bottom:2px solid #c7c7cc}
td.n{font-variant-numeric:tabular-nums}.warning{background:#fff4d6;border-left:4px solid #f0b400;padding:.4rem .7rem}
img{max-width:100%;height:auto;border:1px solid #e5e5ea}code{font-size:.9em}
"""


def render_html(status: dict, plot_png: bytes | None = None, *, history: dict | None = None,
                note: str | None = None, now: float | None = None) -> str:
    """Given a `read_status` answer (runtime/status.py), the plot as PNG bytes (or None,
    with `note` saying why), and `history` ({starts, resumes, checkpoints_kept}, each
    optional), return the page. Every string from the status is escaped."""
    now = time.time() if now is None else now
    state = str(status.get("state") or "unknown")
    run = str(status.get("run") or Path(str(status.get("run_dir") or ".")).name or "run")
    report = status.get("report") if isinstance(status.get("report"), dict) else None
    parts = [f"<h1>{escape(run)} <span class=\"state {escape(state)}\">{escape(state.replace('_', ' '))}</span></h1>"]
    why = status.get("crashed_reason") if state == "crashed" else status.get("reason")
    if why and str(why) != state:
        parts.append(f"<p>{escape(str(why))}</p>")
    parts.append(f"<p class=\"meta\">page written {escape(_when(now))}; run directory "
                 f"<code>{escape(str(status.get('run_dir', '')))}</code></p>")
    for warning in _warnings(report):
        parts.append(f"<p class=\"warning\">{escape(warning)}</p>")
    parts += _table("Run", _run_rows(status, state))
    if report is not None:
        parts += _table("Adapters", _adapter_rows(report))
        parts += _grid("Validation", ("", "base model", "adapters", "change"), _validation_grid(report))
        parts += _grid("Final eval", ("", "base model", "adapters"), _final_eval_grid(report))
    else:
        parts += _table("Validation", _live_validation_rows(status))
    parts += _table("Starts and checkpoints", _history_rows(status, history or {}))
    parts.append("<h2>Loss, validation loss and learning rate</h2>")
    if plot_png:
        data = base64.b64encode(plot_png).decode("ascii")
        parts.append(f"<img alt=\"training loss, validation loss and learning rate by optimizer step\" "
                     f"src=\"data:image/png;base64,{data}\">")
    else:
        parts.append(f"<p class=\"meta\">{escape(note or 'no plot')}</p>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escape(run)}: {escape(state.replace('_', ' '))}</title>\n<style>{CSS}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def write_html(run: RunDir, status: dict, plot_png: bytes | None = None, **kwargs) -> Path:
    """Render the page (`render_html`'s arguments) into run.report_html atomically,
    user-only, and return its path; raise OSError when it cannot be written."""
    ensure_private_dir(run.report_html.parent)
    atomic_write_text(run.report_html, render_html(status, plot_png, **kwargs))
    return run.report_html


class Page:
    """The page of a run directory, kept by the daemon (rank 0; not `run --debug`) and
    written by `status --html`. `heartbeat`, when given, is written first, so the page
    reads what the daemon knows now; `figures(run)` gives {png, note, starts,
    resumes} and is called at an end (`final`) or when the last drawing is older than
    `plot_every_s`."""

    def __init__(self, run: RunDir, figures=None, heartbeat=None, log=None,
                 plot_every_s: float = PLOT_EVERY_S, clock=time.monotonic):
        self.run, self.figures, self.heartbeat, self.log = run, figures, heartbeat, log
        self.plot_every_s, self.clock = plot_every_s, clock
        self._drawn: dict | None = None
        self._drawn_at = 0.0

    def write(self, final: bool = True) -> Path:
        """Write the page from the run's status now and return its path; raise OSError
        when it cannot be written."""
        if self.heartbeat is not None:
            self.heartbeat.write()
        status = read_status(self.run)
        figures = self._figures(final)
        history = {k: figures.get(k) for k in ("starts", "resumes")}
        history["checkpoints_kept"] = sum(1 for _ in manifested_newest_first(self.run.checkpoints))
        return write_html(self.run, status, figures.get("png"), history=history, note=figures.get("note"))

    def refresh(self, final: bool = False) -> Path | None:
        """`write` for the daemon: a failure is logged (`report.html.failed`) and never
        raised, since the page must not stop training."""
        try:
            return self.write(final)
        except Exception as exc:  # noqa: BLE001 - a page is never worth a night's training
            if self.log is not None:
                self.log.warning("report.html.failed", path=str(self.run.report_html),
                                 error=f"{type(exc).__name__}: {exc}")
            return None

    def _figures(self, final: bool) -> dict:
        if self.figures is None:
            return {}
        now = self.clock()
        if final or self._drawn is None or now - self._drawn_at >= self.plot_every_s:
            try:
                self._drawn = dict(self.figures(self.run))
            except Exception as exc:  # noqa: BLE001 - a damaged log costs the plot, not the page
                self._drawn = {"note": f"no plot: {type(exc).__name__}: {exc}"}
            self._drawn_at = now
        return self._drawn


# --------------------------------------------------------------------------- the tables


def _table(title: str, rows: list[tuple[str, str]]) -> list[str]:
    """A heading and a two-column table (label, value); nothing when there is no row."""
    if not rows:
        return []
    body = "".join(f"<tr><th scope=\"row\">{escape(label)}</th><td class=\"n\">{escape(value)}</td></tr>"
                   for label, value in rows)
    return [f"<h2>{escape(title)}</h2>", f"<table>{body}</table>"]


def _grid(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A heading and a table with a header row; nothing when there is no row."""
    if not rows:
        return []
    head = "".join(f"<th scope=\"col\">{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + f"<th scope=\"row\">{escape(row[0])}</th>"
                   + "".join(f"<td class=\"n\">{escape(cell)}</td>" for cell in row[1:]) + "</tr>" for row in rows)
    return [f"<h2>{escape(title)}</h2>", f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"]


def _run_rows(status: dict, state: str) -> list[tuple[str, str]]:
    rows = [("state", state.replace("_", " ") + (f", phase {status['phase']}" if status.get("phase")
                                                 and state in ("running", "paused", "waiting") else ""))]
    step, total, epoch = (json_int(status.get(k)) for k in ("step", "total_steps", "epoch"))
    if step is not None:
        text = f"step {step}" + (f" of {total} ({100.0 * step / total:.1f}%)" if total else "")
        rows.append(("progress", text + (f", epoch {epoch}" if epoch is not None else "")))
    used, left, total_b = (json_number(status.get(k)) for k in ("budget_used_s", "budget_left_s", "budget_total_s"))
    if used is not None or total_b is not None:
        text = f"used {duration(used)}" if used is not None else ""
        if total_b is not None:
            text += f" of {duration(total_b)}" if text else duration(total_b)
        if left is not None:
            text += f", {duration(left)} left"
        rows.append(("budget", text))
    last_end = status.get("last_end") if isinstance(status.get("last_end"), dict) else None
    if last_end and last_end.get("state"):
        text = str(last_end["state"]).replace("_", " ")
        if json_int(last_end.get("step")) is not None:
            text += f" at step {json_int(last_end.get('step'))}"
        if json_number(last_end.get("ended_unix")) is not None:
            text += f", {_when(json_number(last_end['ended_unix']))}"
        reason = last_end.get("reason")
        rows.append(("last end", text + (f": {reason}" if reason and reason != last_end["state"] else "")))
    if status.get("log_path") and state != "not_started":
        rows.append(("log", str(status["log_path"])))
    return rows


def _adapter_rows(report: dict) -> list[tuple[str, str]]:
    rows = []
    if report.get("adapters"):
        rows.append(("adapters", str(report["adapters"])))
        selected, steps = json_int(report.get("selected_step")), json_int(report.get("steps"))
        rule = report.get("selected_rule") or ("lowest validation loss" if selected != steps else "last")
        rule = "the last step" if rule == "last" else rule
        rows.append(("selected step", f"step {selected} of the {steps} trained ({rule})"))
    first, recent = json_number(report.get("first_loss")), json_number(report.get("recent_loss"))
    if first is not None and recent is not None:
        rows.append(("training loss", f"{first:.4f} at step 1 -> {recent:.4f} (mean of the last 10 steps)"))
    first_r, recent_r = json_number(report.get("first_reward")), json_number(report.get("recent_reward"))
    if first_r is not None and recent_r is not None:  # GRPO
        rows.append(("reward", f"{first_r:.3f} at step 1 -> {recent_r:.3f} (mean of the last 10 steps)"))
    if report.get("final_eval_pending"):
        rows.append(("final eval", "cut short by a stop; the next start answers the problems (and only that)"))
    return rows


def _validation_grid(report: dict) -> list[tuple[str, ...]]:
    rows = []
    best_step = json_int(report.get("best_val_step"))
    at = f" (step {best_step})" if best_step is not None else ""
    best_acc, base_acc = json_number(report.get("best_val_accuracy")), json_number(report.get("base_val_accuracy"))
    if best_acc is not None:  # GRPO: greedy accuracy on the validation problems
        rows.append(("validation accuracy", _pct(base_acc), _pct(best_acc) + at,
                     f"{100 * (best_acc - base_acc):+.1f} points" if base_acc is not None else ""))
    else:
        best, base = json_number(report.get("best_val_loss")), json_number(report.get("base_val_loss"))
        if best is not None or base is not None:
            change = f"{100 * (best - base) / base:+.1f}%" if best is not None and base else ""
            rows.append(("validation loss", _f4(base), _f4(best) + (at if best is not None else ""), change))
    return rows


def _final_eval_grid(report: dict) -> list[tuple[str, ...]]:
    final = report.get("final_eval")
    if not isinstance(final, dict) or not isinstance(final.get("base"), dict) \
            or not isinstance(final.get("adapters"), dict):
        return []
    b, a = final["base"], final["adapters"]
    n = json_int(final.get("n"))
    rows = [(f"accuracy ({n} problems)" if n is not None else "accuracy", _pct(b.get("accuracy")),
             _pct(a.get("accuracy"))),
            ("format compliance", _pct(b.get("format_compliance")), _pct(a.get("format_compliance")))]
    kinds_b = b.get("by_kind") if isinstance(b.get("by_kind"), dict) else {}
    kinds_a = a.get("by_kind") if isinstance(a.get("by_kind"), dict) else {}
    for kind in sorted(set(kinds_b) | set(kinds_a), key=str):
        kb, ka = kinds_b.get(kind) or {}, kinds_a.get(kind) or {}
        count = json_int(ka.get("n")) if json_int(ka.get("n")) is not None else json_int(kb.get("n"))
        rows.append((f"{kind} ({count})" if count is not None else str(kind), _pct(kb.get("accuracy")),
                     _pct(ka.get("accuracy"))))
    return rows


def _live_validation_rows(status: dict) -> list[tuple[str, str]]:
    rows = []
    val, val_step = json_number(status.get("val_loss")), json_int(status.get("val_step"))
    if val is not None:
        rows.append(("validation loss", f"{val:.4f}" + (f" at step {val_step}" if val_step is not None else "")))
    best, best_step = json_number(status.get("best_val_loss")), json_int(status.get("best_val_step"))
    if best is not None:
        rows.append(("best", f"{best:.4f}" + (f" at step {best_step}" if best_step is not None else "")))
    base = json_number(status.get("base_val_loss"))
    if base is not None:
        rows.append(("base model", f"{base:.4f}"))
    return rows


def _history_rows(status: dict, history: dict) -> list[tuple[str, str]]:
    rows = []
    if json_int(history.get("starts")) is not None:
        rows.append(("starts", str(history["starts"])))
    if json_int(history.get("resumes")) is not None:
        rows.append(("resumes", str(history["resumes"])))
    ck = json_int(status.get("last_checkpoint_step"))
    if ck is not None:
        at = _parse_iso(status.get("last_checkpoint_at"))
        rows.append(("newest checkpoint", f"step {ck}" + (f", {_when(at)}" if at is not None else "")))
    if json_int(history.get("checkpoints_kept")) is not None:
        rows.append(("checkpoints kept", str(history["checkpoints_kept"])))
    return rows


def _warnings(report: dict | None) -> list[str]:
    warning = validation_warning(report) if report is not None else None
    return [f"{warning[0].upper()}{warning[1:]}."] if warning else []


# --------------------------------------------------------------------------- helpers


def _f4(value: Any) -> str:
    number = json_number(value)
    return f"{number:.4f}" if number is not None else ""


def _pct(value: Any) -> str:
    number = json_number(value)
    return f"{100 * number:.1f}%" if number is not None else ""


def _when(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M %Z")
