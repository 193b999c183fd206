"""End-to-end through the real CLI, as a user runs it: demo, run, generate, bad input.

Each command runs as its own process (`python -m mathlora_daemon ...`), so exit codes, stderr
and the files left in the run directory are what a user or launchd would see.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from runs import ENV
from runs import cli as run_cli
from runs import snapshot as run_snapshot


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=cwd, timeout=600)


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file under run_dir (not the daemon's bookkeeping): bad input must leave them alone."""
    return run_snapshot(run_dir, dirs=False)


def log_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "daemon.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def demo_template(tmp_path_factory) -> Path:
    """A demo run directory prepared once through the CLI (random base: fast)."""
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    result = cli("demo", "--run-dir", str(run_dir), "--prepare-only")
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="session")
def trained(demo_template, tmp_path_factory) -> Path:
    """The demo trained for 30 steps through `run` (shared by the read-only tests)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(demo_template, run_dir)
    result = cli("run", "--run-dir", str(run_dir), "--set", "train.max_steps=30")
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture
def run_dir(demo_template, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(demo_template, target)
    return target


def test_demo_prepare_only_writes_model_data_and_config_user_only(demo_template):
    run = demo_template
    for rel in ("mathlora.toml", "mlx_model/config.json", "mlx_model/model.safetensors", "mlx_model/tokenizer.json",
                "data/train.jsonl", "data/test.jsonl"):
        path = run / rel
        assert path.is_file(), rel
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, rel
    for rel in (".", "mlx_model", "data"):
        assert stat.S_IMODE((run / rel).stat().st_mode) == 0o700, rel
    assert not (run / "adapters").exists()  # prepare-only trains nothing
    rows = [json.loads(line) for line in (run / "data" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and all(r["solution"].endswith(f"$\\boxed{{{r['answer']}}}$.") for r in rows)


def test_demo_refuses_a_directory_holding_other_files(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    result = cli("demo", "--run-dir", str(tmp_path), "--prepare-only")
    assert result.returncode == 78
    assert "thesis.tex" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


def test_run_trains_logs_every_step_and_the_loss_falls(trained):
    events = log_events(trained)
    for event in events:  # the JSON-lines contract: every line has these fields
        assert {"ts", "level", "event", "run"} <= event.keys(), event
    steps = [e for e in events if e["event"] == "train.step"]
    assert [e["step"] for e in steps] == list(range(1, 31))
    for e in steps:
        assert e["tokens"] > 0 and e["tok_per_s"] > 0
        assert {"mem_active_gb", "mem_peak_gb", "rss_gb", "sys_available_gb"} <= e.keys()
    # The demo's schedule over the run's 30 steps: 5 warm-up steps up to the peak (3e-3),
    # then cosine down towards the floor (min_lr_ratio 0.1 of the peak), never up again.
    lrs = [e["lr"] for e in steps]
    assert lrs[0] == pytest.approx(3e-3 / 5) and lrs[4] == pytest.approx(3e-3)
    assert all(b > a for a, b in zip(lrs[:5], lrs[1:5])), lrs
    assert lrs[-1] == pytest.approx(3e-4, rel=0.05) and all(b <= a for a, b in zip(lrs[4:], lrs[5:])), lrs
    losses = [e["loss"] for e in steps]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    lora = next(e for e in events if e["event"] == "model.lora")
    assert lora["trainable_params"] == 69_632  # rank 16 on 7 linears of 2 layers, hidden 128, mlp 256
    assert events[-1]["event"] == "daemon.stop" and events[-1]["exit_code"] == 0


def test_adapters_load_in_mlx_lm_unchanged(trained):
    adapters = trained / "adapters"
    assert stat.S_IMODE((adapters / "adapters.safetensors").stat().st_mode) == 0o600
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["scale"] == 2.0
    result = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(trained / "mlx_model"),
                             "--adapter-path", str(adapters), "--prompt", "Solve for x: 2x + 1 = 7",
                             "--max-tokens", "8", "--temp", "0"], capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Generation:" in result.stdout


def test_generate_is_greedy_at_temperature_zero_and_uses_the_adapters(trained):
    args = ("generate", "--run-dir", str(trained), "--prompt", "What is 20% of 150?", "--temperature", "0",
            "--max-new-tokens", "24")
    first, second = cli(*args), cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()
    assert "adapters" in first.stderr  # says which weights answered
    base = cli(*args, "--no-adapters")
    assert base.returncode == 0 and "no adapters" in base.stderr


def test_run_debug_takes_ten_rows_a_few_steps_and_leaves_real_adapters_alone(run_dir):
    result = cli("run", "--debug", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert (run_dir / "debug" / "adapters" / "adapters.safetensors").is_file()
    assert not (run_dir / "adapters").exists()
    assert not (run_dir / "logs").exists() and not (run_dir / "state").exists()  # the real run: untouched
    events = log_events(run_dir / "debug")  # a debug run logs into debug/logs
    done = next(e for e in events if e["event"] == "data.prepare.done")
    assert done["rows"] == 10
    assert len([e for e in events if e["event"] == "train.step"]) == 2  # 10 rows / 8 per step


def test_prepare_reports_counts_and_reuses_the_cache(run_dir):
    first = cli("prepare", "--run-dir", str(run_dir))
    assert first.returncode == 0, first.stderr
    assert "rows 600, used 600, skipped 0" in first.stdout
    second = cli("prepare", "--run-dir", str(run_dir))
    assert second.returncode == 0 and second.stdout == first.stdout
    events = [e["event"] for e in log_events(run_dir)]
    assert events.count("data.prepare.done") == 1 and events.count("data.prepare.cached") == 1


def _write_rows(path: Path, rows: list[dict | str]) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_rows_missing_a_field_are_skipped_and_counted(run_dir):
    good = {"problem": "Compute 2 + 3.", "solution": "2 + 3 = 5.\nThe final answer is $\\boxed{5}$."}
    _write_rows(run_dir / "data" / "mixed.jsonl", [good, {"problem": "no solution"}, good, {"problem": "x", "solution": " "}])
    result = cli("prepare", "--run-dir", str(run_dir), "--set", "data.name=data/mixed.jsonl")
    assert result.returncode == 0, result.stderr
    assert "rows 4, used 2, skipped 2" in result.stdout
    skipped = next(e for e in log_events(run_dir) if e["event"] == "data.prepare.skipped")
    assert skipped["skipped"] == 2
    assert skipped["first"] == ["mixed.jsonl:2 (missing 'solution')", "mixed.jsonl:4 (empty or non-text 'solution')"]


@pytest.fixture
def used_run(trained, tmp_path) -> Path:
    """A run directory with a token cache and adapters in it: bad input must keep them."""
    target = tmp_path / "used"
    shutil.copytree(trained, target)
    return target


BAD_INPUTS = {
    "malformed_toml": ("mathlora.toml", "[train\nlearning_rate = 1e-4\n", (), ["mathlora.toml", "line 1"]),
    "unknown_key": (None, None, ("--set", "lora.rnak=4"), ["lora.rnak", "did you mean 'lora.rank'"]),
    "wrong_type": (None, None, ("--set", "train.batch_size=\"four\""), ["train.batch_size", "an integer"]),
    "out_of_range": (None, None, ("--set", "lora.rank=0"), ["lora.rank = 0", "from 1 to 4096"]),
    "broken_json_line_3": ("data/broken.jsonl", '{"problem": "a", "solution": "b"}\n{"problem": "c", "solution": "d"}\n'
                           '{"problem": "e", "solution": \n', ("--set", "data.name=data/broken.jsonl"),
                           ["broken.jsonl", "line 3"]),
    "empty_dataset": ("data/empty.jsonl", '{"problem": "a"}\n{"solution": "b"}\n', ("--set", "data.name=data/empty.jsonl"),
                      ["no usable rows", "2 rows read, 2 skipped"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_78_with_a_clear_message_and_changes_nothing(used_run, case):
    rel, content, extra, expected = BAD_INPUTS[case]
    if rel is not None:
        (used_run / rel).write_text(content)
    before = snapshot(used_run)
    result = cli("run", "--run-dir", str(used_run), *extra)
    assert result.returncode == 78, (result.stdout, result.stderr)
    for text in expected:
        assert text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(used_run) == before  # adapters, cache, data, model, config: all intact
    assert not list((used_run / "cache").glob(".tmp-*"))


def test_python_daemon_installed_beside_it_changes_nothing(tmp_path):
    # PyPI's python-daemon owns the top-level `daemon` module (the test extra installs it
    # into this very environment); ours installs as mathlora_daemon, so both work. (Away
    # from the repository's root, where the folder daemon/ itself would be found first.)
    theirs = subprocess.run([sys.executable, "-c", "import daemon; print(daemon.DaemonContext.__module__)"],
                            capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert theirs.returncode == 0 and theirs.stdout.startswith("daemon"), theirs.stderr
    console = shutil.which("mathlora-daemon", path=str(Path(sys.executable).parent))
    for argv in ([console, "status", "--run-dir", str(tmp_path)],
                 [sys.executable, "-m", "mathlora_daemon", "status", "--run-dir", str(tmp_path)]):
        done = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
        assert done.returncode == 0 and "not started" in done.stdout, done.stderr


def test_python_dash_m_daemon_is_the_same_cli():
    result = subprocess.run([sys.executable, "-m", "mathlora_daemon", "--help"], capture_output=True, text=True,
                            env=ENV)
    assert result.returncode == 0
    for command in ("run", "prepare", "generate", "demo"):
        assert command in result.stdout
    console = shutil.which("mathlora-daemon", path=str(Path(sys.executable).parent))
    assert console is not None, "the console script is installed next to the interpreter"
