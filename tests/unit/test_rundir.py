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
        "data": "data", "report_file": "report.json", "report_html": "report.html",
    }
    for attr, rel in expected.items():
        assert getattr(run, attr) == tmp_path / rel, attr
    assert run.export("peft") == tmp_path / "export" / "peft"


def test_the_model_path_is_relative_to_the_run_directory_unless_absolute(tmp_path):
    run = RunDir(tmp_path)
    assert run.model("mlx_model") == tmp_path / "mlx_model"
    assert run.model("/models/ds") == Path("/models/ds")
    assert run.model("~/m") == Path.home() / "m"


def test_a_debug_run_keeps_everything_it_writes_apart(tmp_path):
    run, real = RunDir(tmp_path, debug=True), RunDir(tmp_path)
    debug = tmp_path / "debug"
    assert run.checkpoints == debug / "checkpoints" and run.adapters == debug / "adapters"
    # its own status, log, lock, crash records and report: the real run's stay as they are
    for name in ("log_file", "status_file", "control_file", "starts_file", "failure_file", "lock_file",
                 "report_file", "report_html"):
        assert getattr(run, name).is_relative_to(debug), name
        assert not getattr(real, name).is_relative_to(debug), name
    # what it reads is the real run's
    assert run.config == real.config and run.model("mlx_model") == real.model("mlx_model")
    assert run.cache == real.cache and run.data == real.data
