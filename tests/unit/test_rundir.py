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


def test_no_module_but_rundir_spells_a_run_directory_name():
    """Every path inside a run directory comes from RunDir (docs/DESIGN.md, "Run
    directory"): a name joined onto a path, or a path-like string starting with one,
    anywhere else in the package would be a second truth."""
    import re

    from mathlora_daemon.rundir import entry_names

    from runs import ROOT

    names = sorted(entry_names() | {"train.jsonl", "test.jsonl", "status.json", "stage.json", "control.json"})
    alternatives = "|".join(re.escape(n) for n in names)
    joined = re.compile(rf"""/\s*["']({alternatives})["']|["']({alternatives})/[\w.{{-]""")
    found = []
    for path in sorted((ROOT / "daemon").rglob("*.py")):
        if path.name == "rundir.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if joined.search(line) and "not a run directory" not in line:
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "run-directory names spelled outside rundir.py:\n" + "\n".join(found)
