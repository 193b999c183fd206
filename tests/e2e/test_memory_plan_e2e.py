"""The memory plan through the real CLI: `prepare` prints it; a `run` whose training step
will not fit in `daemon.memory_limit_gb` exits 78 before loading the model, naming the
settings that would fit with their estimates, and loses nothing: the next start with
room enough resumes from the same checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

from runs import cli, copy, events, sha


def files(run: Path) -> dict[str, str]:
    """Every file of the run's checkpoints and adapters, by path, with its SHA-256."""
    return {str(p.relative_to(run)): sha(p) for folder in ("checkpoints", "adapters")
            for p in sorted((run / folder).rglob("*")) if p.is_file()}


def since_last_start(run: Path) -> list[dict]:
    logged = events(run)
    starts = [i for i, e in enumerate(logged) if e["event"] == "daemon.start"]
    return logged[starts[-1]:]


def test_a_run_that_will_not_fit_exits_78_naming_what_would_and_loses_nothing(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    first = cli("run", "--set", "train.max_steps=4", run=run)
    assert first.returncode == 0, first.stderr
    assert re.search(r"memory plan: ~\d+ MB peak \(weights .*\) of [\d.]+ GB available \(available RAM\)",
                     first.stderr)
    kept, report = files(run), json.loads((run / "report.json").read_text())
    assert "checkpoints/step-00000004/adapters.safetensors" in kept and "adapters/adapters.safetensors" in kept

    refused = cli("run", "--set", "train.max_steps=8", "--set", "daemon.memory_limit_gb=0.01", run=run)
    assert refused.returncode == 78, refused.stderr
    assert re.search(r"error: memory plan: ~\d+ MB peak .* of 10 MB available \(daemon\.memory_limit_gb = 0\.01\): "
                     r"the training step will not fit", refused.stderr)
    assert re.search(r"\n  data\.max_seq_len = \d+: ~\d+ MB\n", refused.stderr)  # the tiny run's remedy
    assert "Or raise daemon.memory_limit_gb (now 0.01)" in refused.stderr
    this_start = since_last_start(run)
    names = [e["event"] for e in this_start]
    assert "model.load.start" not in names and "train.start" not in names  # refused before anything heavy
    plan = next(e for e in this_start if e["event"] == "memory.plan")
    assert plan["fits"] is False and plan["available_gb"] == 0.01 and plan["peak_gb"] > 0.01
    assert this_start[-1]["event"] == "daemon.stop" and this_start[-1]["exit_code"] == 78
    assert files(run) == kept  # no checkpoint or adapter touched
    after = json.loads((run / "report.json").read_text())
    assert after["state"] == "failed" and "memory plan" in after["reason"]
    assert after["step"] == report["step"] == 4 and after["report"] == report["report"]  # the last end's figures

    resumed = cli("run", "--set", "train.max_steps=8", run=run)  # room enough again
    assert resumed.returncode == 0, resumed.stderr
    this_start = since_last_start(run)
    assert next(e for e in this_start if e["event"] == "resume")["from_step"] == 4
    assert next(e for e in this_start if e["event"] == "train.done")["steps"] == 8


def test_prepare_prints_the_plan(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    result = cli("prepare", run=run)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^memory plan: ~\d+ MB peak \(weights <1 MB, LoRA\+Adam <1 MB, activations \d+ MB, "
                     r"logits (<1|\d+) MB\) of [\d.]+ GB available \(available RAM\)$", result.stderr, re.M)
    assert result.stdout.startswith("rows ")  # stdout stays the counts (the same at every prepare)
    assert [e["event"] for e in events(run)].count("memory.plan") == 1
