"""`plot`: the loss and learning-rate curves of a run, across all its restarts, as a PNG.

Reads the structured log (`logs/daemon.jsonl` and its rotated predecessors, oldest first)
and draws two panels over the optimizer step: the training loss (raw and a moving average)
with the validation loss at every evaluation (the best one ringed), and the learning
rate, with a dashed line at every resume and a tick at every checkpoint. Steps
trained again after a crash (between the last checkpoint and the crash) appear once, with
the value of the run that counted (the last one logged). Lines of `--debug` runs, which
share the log, are left out. matplotlib is an optional extra (`mathlora-daemon[plot]`)
and is imported only here, with the Agg canvas (no display needed). `page_figures` draws
the same figure in memory for the morning report's page (runtime/report_page.py), and
goes without it, saying why, when matplotlib is missing.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mathlora_checkpoints.fsio import atomic_write_via, ensure_private_dir
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime import logview

INSTALL_PLOT = "pip install 'mathlora-daemon[plot]'"


@dataclass
class Curve:
    """What a run's log says about its training, step by step."""

    run: str | None = None
    loss: dict[int, float] = field(default_factory=dict)
    lr: dict[int, float] = field(default_factory=dict)
    val: dict[int, float] = field(default_factory=dict)  # step -> validation loss (step 0: the base model)
    resumes: list[int] = field(default_factory=list)
    checkpoints: set[int] = field(default_factory=set)
    starts: int = 0
    bad_lines: int = 0


def log_files(run: RunDir) -> list[Path]:
    """Given a run directory, return its log files oldest first (daemon.jsonl.5 ...
    daemon.jsonl.1, daemon.jsonl); raise InputError when there is none."""
    current, rotated = logview.log_files(run)
    files = rotated + ([current] if current.is_file() else [])
    if not files:
        raise InputError(f"--run-dir {run.root}: no log at {current} (has the daemon run here?)")
    return files


def read_curve(run: RunDir) -> Curve:
    """Given a run directory, return its Curve from every log file; unreadable lines are
    counted and skipped; raise InputError when there is no log."""
    curve = Curve()
    debug = False
    for path in log_files(run):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    event = json.loads(line)
                    name = event["event"]
                except (ValueError, TypeError, KeyError):
                    curve.bad_lines += int(bool(line.strip()))  # a torn last line after a power loss
                    continue
                if name == "daemon.start":
                    debug = bool(event.get("debug"))
                    curve.starts += int(not debug)
                if debug:
                    continue  # `run --debug` logs here too, but trains throw-away adapters
                curve.run = event.get("run", curve.run)
                _take(curve, name, event)
    return curve


def _take(curve: Curve, name: str, event: dict) -> None:
    try:
        if name == "train.step":
            step = int(event["step"])
            curve.loss[step] = float(event["loss"])  # a step re-done after a crash: the last one counts
            if event.get("lr") is not None:
                curve.lr[step] = float(event["lr"])
        elif name == "train.eval":
            curve.val[int(event["step"])] = float(event["val_loss"])
        elif name == "resume":
            curve.resumes.append(int(event["from_step"]))
        elif name == "checkpoint.saved":
            curve.checkpoints.add(int(event["step"]))
    except (KeyError, TypeError, ValueError):
        curve.bad_lines += 1


def moving_average(values: list[float], window: int) -> list[float]:
    """Given values and a window, return the trailing mean of each value and the up to
    window - 1 before it (shorter at the start, so the curve begins at the first point)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(run: RunDir, out: Path) -> dict:
    """Given a run directory and a PNG path, draw the run's loss and learning-rate curves
    there (replaced atomically, 0600) and return {points, resumes, checkpoints, starts,
    path}; raise InputError when there is no log, nothing trained yet, or matplotlib is
    not installed."""
    try:
        import matplotlib  # noqa: F401 - only whether it is there; draw() imports what it uses
    except ImportError:
        raise InputError(f"plot needs matplotlib: {INSTALL_PLOT}") from None

    out = Path(out)
    curve = read_curve(run)
    if curve.bad_lines:  # said, not dropped silently: the curve has a gap there
        print(logview.damaged_note(run.log_file, curve.bad_lines), file=sys.stderr)
    if not curve.loss:
        raise InputError(f"{run.log_file}: no train.step events yet; nothing to plot")
    fig = draw(curve, curve.run or run.root.resolve().name)
    ensure_private_dir(out.parent)
    atomic_write_via(out, lambda tmp: fig.savefig(tmp, format="png"))
    return {"points": len(curve.loss), "evals": len(curve.val), "resumes": len(curve.resumes),
            "checkpoints": len(curve.checkpoints), "starts": curve.starts, "path": str(out)}


def draw(curve: Curve, name: str, dpi: int = 120):
    """Given a Curve with at least one step and the run's name, return the matplotlib
    Figure (Agg canvas): loss and validation loss above, the learning rate below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import blended_transform_factory

    steps = sorted(curve.loss)
    losses = [curve.loss[s] for s in steps]
    fig = Figure(figsize=(9, 6.5), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    window = max(1, min(100, len(steps) // 20))
    # Raw losses are noisy (one step's batch): faint under the mean once there is one.
    ax_loss.plot(steps, losses, color="tab:blue", alpha=0.35 if window > 1 else 1.0, linewidth=1, label="loss")
    if window > 1:
        ax_loss.plot(steps, moving_average(losses, window), color="tab:blue", linewidth=2,
                     label=f"loss, mean of {window} steps")
    if curve.val:
        val_steps = sorted(curve.val)
        ax_loss.plot(val_steps, [curve.val[s] for s in val_steps], color="tab:purple", marker="o", markersize=4,
                     linewidth=1.5, label="validation loss")
        best = min(val_steps, key=lambda s: (curve.val[s], s))
        ax_loss.plot([best], [curve.val[best]], linestyle="none", marker="o", markersize=11, markerfacecolor="none",
                     markeredgecolor="tab:purple", label=f"best validation, step {best}")
    for i, step in enumerate(curve.resumes):
        for ax in (ax_loss, ax_lr):
            ax.axvline(step, color="tab:red", linestyle="--", linewidth=1, label="resume" if i == 0 else None)
    if curve.checkpoints:
        # Ticks along the bottom edge, in data x and axes y, so they never hide the curve.
        at_bottom = blended_transform_factory(ax_loss.transData, ax_loss.transAxes)
        ckpts = sorted(curve.checkpoints)
        ax_loss.plot(ckpts, [0.0] * len(ckpts), transform=at_bottom, linestyle="none", marker="^",
                     markersize=6, color="tab:green", clip_on=False, label="checkpoint")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_loss.set_title(f"{name}: {len(steps)} steps, {curve.starts} start(s), {len(curve.resumes)} resume(s), "
                      f"{len(curve.checkpoints)} checkpoint(s)", fontsize=10)
    if curve.lr:
        lr_steps = sorted(curve.lr)
        ax_lr.plot(lr_steps, [curve.lr[s] for s in lr_steps], color="tab:orange", linewidth=1.5)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        ax_lr.text(0.5, 0.5, "no learning rate logged", transform=ax_lr.transAxes, ha="center", va="center")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(True, alpha=0.3)
    return fig


def page_figures(run: RunDir, dpi: int = 80) -> dict:
    """Given a run directory, return what the report page (runtime/report_page.py) takes
    from the log: {"starts", "resumes", "png": the plot as PNG bytes or None, "note": why
    there is no plot, or None}. Never raises for a missing or empty log or a missing
    matplotlib: the page goes without the plot and says why."""
    import io

    try:
        curve = read_curve(run)
    except InputError:
        return {"starts": 0, "resumes": 0, "png": None, "note": "no plot yet: the daemon has not logged here"}
    figures = {"starts": curve.starts, "resumes": len(curve.resumes), "png": None, "note": None}
    if not curve.loss:
        figures["note"] = "no plot yet: no training step logged"
        return figures
    try:
        fig = draw(curve, curve.run or run.root.resolve().name, dpi=dpi)
    except ImportError:
        figures["note"] = f"no plot: it needs matplotlib ({INSTALL_PLOT})"
        return figures
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    figures["png"] = buffer.getvalue()
    return figures
