"""The run-directory contract (docs/DESIGN.md, "Run directory"): every path in one place,
with the names users, scripts and launchd rely on."""

from __future__ import annotations

from pathlib import Path

from mathlora_daemon.rundir import RunDir


def test_every_path_has_its_documented_name(tmp_path):
    run = RunDir(tmp_path)
    expected = {
        "config": "mathlora.toml", "cache": "cache", "kernel_cache": "cache/mlx-kernels", "checkpoints": "checkpoints",
        "adapters": "adapters", "log_file": "logs/daemon.jsonl", "status_file": "state/status.json",
        "control_file": "state/control.json", "starts_file": "state/starts.json",
        "failure_file": "state/failure.json", "lock_file": "daemon.lock", "fused": "fused", "plot": "loss.png",
        "data": "data",
    }
    for attr, rel in expected.items():
        assert getattr(run, attr) == tmp_path / rel, attr
    assert run.export("peft") == tmp_path / "export" / "peft"


def test_the_model_path_is_relative_to_the_run_directory_unless_absolute(tmp_path):
    run = RunDir(tmp_path)
    assert run.model("mlx_model") == tmp_path / "mlx_model"
    assert run.model("/models/ds") == Path("/models/ds")
    assert run.model("~/m") == Path.home() / "m"


def test_a_debug_run_keeps_its_checkpoints_and_adapters_apart(tmp_path):
    run = RunDir(tmp_path, debug=True)
    assert run.checkpoints == tmp_path / "debug" / "checkpoints"
    assert run.adapters == tmp_path / "debug" / "adapters"
    assert run.log_file == RunDir(tmp_path).log_file  # one log for the run directory
