"""Tests for `plot`: a synthetic log with a crash, a resume, re-done steps, checkpoints,
a debug run, a rotated file and a garbage line gives a PNG and the right counts."""

from __future__ import annotations

import json
import stat
import sys

import pytest

from mathlora_daemon.cli import arguments
from mathlora_daemon.cli import evaluation as eval_cli
from mathlora_daemon.errors import InputError
from mathlora_daemon.evaluation.plot import page_figures, plot_run, read_curve
from mathlora_daemon.rundir import RunDir

LR = 2e-4


def ev(event: str, **fields) -> str:
    return json.dumps({"run": "night-1", **fields, "event": event, "level": "info", "ts": "2026-01-01T00:00:00Z"})


def steps(first: int, last: int, offset: float = 0.0) -> list[str]:
    return [ev("train.step", step=s, epoch=0, loss=5.0 - 0.1 * s + offset, lr=LR) for s in range(first, last + 1)]


@pytest.fixture
def run(tmp_path):
    """Start 1 trains steps 1-6, checkpoints at 4 and crashes (its lines are in the rotated
    file, ending in a torn line); a debug run logs steps of its own; start 2 resumes from
    4, trains 5-10 again with other losses and checkpoints at 8 and 10."""
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    first = [ev("daemon.start", pid=1, debug=False), ev("train.eval", step=0, val_loss=4.0), *steps(1, 4),
             ev("train.eval", step=4, val_loss=3.0), ev("checkpoint.saved", step=4), *steps(5, 6),
             '{"run": "night-1", "step": 7, "ev']  # SIGKILL mid-write
    debug = [ev("daemon.start", pid=2, debug=True), *steps(1, 3, offset=50.0), ev("checkpoint.saved", step=3),
             ev("daemon.stop", reason="finished", exit_code=0)]
    second = [ev("daemon.start", pid=3, debug=False), ev("resume", from_step=4), *steps(5, 8, offset=1.0),
              ev("train.eval", step=8, val_loss=3.5), ev("checkpoint.saved", step=8), "not json at all",
              *steps(9, 10, offset=1.0), ev("checkpoint.saved", step=10), ev("train.done", steps=10),
              ev("daemon.stop", reason="finished")]
    (logs / "daemon.jsonl.1").write_text("\n".join(first) + "\n")
    (logs / "daemon.jsonl").write_text("\n".join(debug + second) + "\n")
    return tmp_path / "run"


def test_counts_and_last_value_wins(run):
    curve = read_curve(RunDir(run))
    assert sorted(curve.loss) == list(range(1, 11))  # steps 5 and 6 were trained twice: once each here
    assert curve.loss[5] == pytest.approx(5.0 - 0.5 + 1.0)  # the resumed run's value, not the crashed one's
    assert curve.loss[2] == pytest.approx(4.8)  # the debug run's steps are left out
    assert curve.resumes == [4] and curve.checkpoints == {4, 8, 10} and curve.starts == 2
    assert curve.bad_lines == 2 and curve.run == "night-1"
    assert set(curve.lr.values()) == {LR}
    assert curve.val == {0: 4.0, 4: 3.0, 8: 3.5}  # the base model's, then one per checkpoint


def test_plot_writes_a_png(run):
    out = run / "figs" / "loss.png"
    info = plot_run(RunDir(run), out)
    assert info == {"points": 10, "evals": 3, "resumes": 1, "checkpoints": 3, "starts": 2, "path": str(out)}
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < len(data) < 2_000_000
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in out.parent.iterdir()] == ["loss.png"]  # no temporary left


def test_cli_default_output(run, capsys):
    assert eval_cli.plot(arguments.parse(["plot", "--run-dir", str(run)])) == 0
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "10 steps, 3 validation point(s), 1 resume(s), 3 checkpoint(s)" in capsys.readouterr().out


def test_missing_or_empty_log_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no log"):
        plot_run(RunDir(tmp_path), tmp_path / "loss.png")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "daemon.jsonl").write_text(ev("daemon.start", debug=False) + "\n")
    with pytest.raises(InputError, match="nothing to plot"):
        plot_run(RunDir(tmp_path), tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


def test_without_matplotlib_says_what_to_install(run, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    with pytest.raises(InputError, match=r"pip install 'mathlora-daemon\[plot\]'"):
        plot_run(RunDir(run), run / "loss.png")


def test_the_report_page_gets_the_figure_in_memory_or_a_note_why_not(run, tmp_path, monkeypatch):
    figures = page_figures(RunDir(run))
    assert figures["png"][:8] == b"\x89PNG\r\n\x1a\n" and figures["note"] is None
    assert (figures["starts"], figures["resumes"]) == (2, 1)
    assert not (run / "loss.png").exists()  # nothing written
    assert page_figures(RunDir(tmp_path))["note"].startswith("no plot yet")  # no log: no error either
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    without = page_figures(RunDir(run))
    assert without["png"] is None and "pip install 'mathlora-daemon[plot]'" in without["note"]
    assert without["starts"] == 2
