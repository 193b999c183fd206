"""The demo's walkthrough around the training it runs: a second run in the same
directory starts over, and the commands it prints work pasted into a shell."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from mathlora_daemon.demo import walkthrough
from mathlora_daemon.rundir import RunDir


def test_a_second_demo_removes_the_previous_training_outputs_only(tmp_path):
    run = tmp_path / "demo"
    walkthrough.prepare_demo(RunDir(run))
    for name in ("checkpoints/step-00000025", "adapters", "state", "logs", "debug/adapters", "export/peft", "fused",
                 "cache/abc"):
        (run / name).mkdir(parents=True)
    (run / "loss.png").write_bytes(b"png")
    (run / "report.json").write_text("{}")
    (run / "report.html").write_text("<!DOCTYPE html>")
    kept = {p.name for p in run.iterdir()} - {"checkpoints", "adapters", "state", "logs", "debug", "export", "fused",
                                              "loss.png", "report.json", "report.html"}
    cleared = walkthrough.clear_previous_run(RunDir(run))
    assert set(cleared) == {"checkpoints", "adapters", "state", "logs", "debug", "export", "fused", "loss.png",
                            "report.json", "report.html"}
    assert {p.name for p in run.iterdir()} == kept and {"mlx_model", "data", "cache", "mathlora.toml"} <= kept
    assert walkthrough.clear_previous_run(RunDir(run)) == []  # nothing left to say


def test_next_commands_paste_as_printed(tmp_path, monkeypatch):
    run = tmp_path / "my demo's dir"
    lines = walkthrough.next_commands(RunDir(run))
    for line in lines:
        argv = shlex.split(line)
        assert Path(argv[0]).is_absolute() and Path(argv[0]).exists(), line
        if "--run-dir" in argv:
            assert argv[argv.index("--run-dir") + 1] == str(run), line
    assert any(shlex.split(line)[-3:] == ["plot", "--run-dir", str(run)] for line in lines)

    # Without matplotlib (the demo's `.[cpu]` does not bring it) the line that installs it
    # comes right before plot's.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    lines = walkthrough.next_commands(RunDir(run))
    assert shlex.split(lines[-2]) == [str(Path(sys.executable).absolute()), "-m", "pip", "install", "matplotlib"]
    assert "plot" in shlex.split(lines[-1])
