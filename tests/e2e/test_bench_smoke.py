"""The benchmarks' CI smoke runs (CPU, no timing asserted): bench/train_bench.py and
bench/distributed_bench.py run end to end and write the records and tables users read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from runs import ROOT

# --- the benchmark, end to end (CPU, no timing assertions) ------------------------------------

def test_train_bench_tiny_smoke(tmp_path):
    out, md = tmp_path / "results.json", tmp_path / "results.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_bench.py"), "--shape", "tiny", "--batch", "1,2",
                           "--steps", "3", "--warmup", "1", "--which", "daemon,daemon-ungrouped,bare", "--seq", "64",
                           "--lengths", "fixed,real", "--prep-rows", "100", "--out", str(out), "--md", str(md)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())

    head = doc["header"]
    assert {"command", "mlx_device", "mlx_device_name", "versions", "platform", "model", "seq"} <= head.keys()
    assert "train_bench.py" in head["command"] and head["versions"]["mlx.core"] == mx.__version__
    assert head["model"]["num_hidden_layers"] == 2 and head["seq"] == 64

    records = [r for r in doc["records"] if "skipped" not in r]
    skipped = [r for r in doc["records"] if "skipped" in r]
    assert sorted((r["lengths"], r["loop"], r["batch"]) for r in records) == [
        ("fixed", "bare", 1), ("fixed", "bare", 2), ("fixed", "daemon", 1), ("fixed", "daemon", 2),
        ("real", "daemon", 1), ("real", "daemon", 2), ("real", "daemon-ungrouped", 1), ("real", "daemon-ungrouped", 2)]
    assert {(r["lengths"], r["loop"]) for r in skipped} == {("fixed", "daemon-ungrouped"), ("real", "bare")}
    for r in records:
        assert r["measured_steps"] == 3 and len(r["all_step_s"]) == 3
        assert r["step_s_median"] > 0 and r["tok_per_s"] > 0 and r["tok_per_s_mean"] > 0
        assert r["peak_gb"] >= 0 and r["compiled"] is True and r["first_step_s"] > 0
        assert np.isfinite(r["first_loss"]) and np.isfinite(r["last_loss"])
    for r in (r for r in records if r["lengths"] == "fixed"):  # T + 1 tokens: exactly T = 64 positions
        assert r["tok_per_s"] == pytest.approx(r["batch"] * 64 / r["step_s_median"], rel=1e-3)
    for r in (r for r in records if r["loop"].startswith("daemon")):
        assert r["checkpoint_bytes"] > 0 and r["checkpoint_save_s"] >= 0 and r["checkpoint_restore_s"] >= 0
        assert r["train_step_s_median"] > 0 and r["boundary_ms_median"] >= 0
        assert r["traces"] >= 1 and r["compile_s"] > 0 and r["first_compile_s"] > 0
        assert r["budget_used_s"] > 0
    for r in (r for r in records if r["lengths"] == "real"):  # real (non-pad) tokens over time
        assert 0 <= r["padding_share"] < 1 and r["vs_fixed"] > 0
        assert r["group_by_length"] is (r["loop"] == "daemon")
        assert r["positions_per_s"] >= r["tok_per_s"]
    assert all(r["vs_bare"] > 0 for r in records if r["loop"] == "daemon" and r["lengths"] == "fixed")
    real = doc["real_lengths"]
    assert real["rows_over_seq_share"] > 0.5 and real["sequences"] > real["rows"]  # long rows were chunked
    # Same tokens in the same order: the daemon's first step sees what the bare loop sees.
    by = {(r["lengths"], r["loop"], r["batch"]): r for r in records}
    for batch in (1, 2):
        assert by["fixed", "daemon", batch]["first_loss"] == pytest.approx(by["fixed", "bare", batch]["first_loss"],
                                                                           abs=1e-3)

    prep = doc["data_prep"]
    assert prep["rows"] == 100 and prep["sequences"] >= 100 and prep["tokens"] > 0
    assert prep["rows_per_s"] > 0 and prep["tokens_per_s"] > 0 and prep["cache_load_s_median"] >= 0

    table = md.read_text()
    assert table.strip() == proc.stdout.strip()
    rows = [line for line in table.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == len(doc["records"])
    for r in records:
        assert any(f"| {r['lengths']} | {r['loop']} | {r['batch']} x 1 |" in row for row in rows), r
    assert "data preparation" in table and head["command"] in table and "Real lengths:" in table


def test_distributed_bench_tiny_smoke(tmp_path):
    from runs import free_port_range

    out, md = tmp_path / "dist.json", tmp_path / "dist.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "distributed_bench.py"), "--shape", "tiny", "--seq",
                           "64", "--batch", "2", "--ranks", "1,2", "--steps", "2", "--warmup", "1",
                           "--starting-port", str(free_port_range(2)), "--out", str(out), "--md", str(md)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    assert [(r["ranks"], r["global_batch"]) for r in records] == [(1, 2), (2, 4)]
    assert records[1]["backend"] == "ring"
    for r in records:  # every rank's share of every step was trained and counted
        assert r["tokens_per_step"] == r["global_batch"] * 64 and r["tokens_per_s"] > 0  # T = 64 positions each
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ranks"], abs=1e-3)
    assert "| 2 | ring | 4 |" in md.read_text()


def test_train_bench_records_unavailable_loops_as_skipped(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_bench.py"), "--shape", "tiny", "--batch", "1",
                           "--steps", "1", "--warmup", "0", "--which", "daemon-dequant", "--seq", "32",
                           "--prep-rows", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    assert len(records) == 1 and "no 4-bit layers" in records[0]["skipped"]
    assert "| daemon-dequant | 1 x 1 |" in proc.stdout and "skipped" in proc.stdout


def test_pack_bench_counts_the_packed_padding_of_each_set(template_dir, tmp_path):
    """bench/pack_bench.py --padding-only (the padding figures of bench/RESULTS.md): each set
    prepared with data.pack by the real CLI; the rows never more than best-fit's alone."""
    out = tmp_path / "padding.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "pack_bench.py"), "--model-dir",
                           str(template_dir / "mlx_model"), "--work", str(tmp_path / "work"), "--rows-per-set", "200",
                           "--max-seq-len", "512", "--sets", "demo,answer-only", "--padding-only", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"demo", "answer-only"}
    for r in results.values():
        assert r["sequences"] == 200 and r["fewest_rows"] <= r["rows"] <= r["best_fit_rows"]
        assert 0 <= r["padding"] <= r["best_fit_padding"] < 1


def test_passk_bench_pass_at_is_the_chance_that_a_draw_of_k_holds_a_right_answer():
    """bench/passk_bench.py's estimator against counting every draw of k of the n samples."""
    import itertools

    sys.path.insert(0, str(ROOT / "bench"))
    from passk_bench import pass_at

    for n, c in [(8, 0), (8, 1), (8, 3), (8, 8), (5, 2)]:
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            draws = list(itertools.combinations(samples, k))
            assert pass_at(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws)), (n, c, k)


def test_passk_bench_measures_the_base_model_and_trained_adapters(reference, tmp_path):
    """bench/passk_bench.py on the tiny run's trained adapters and the base model: one
    summary each, pass@1 the sampled accuracy, pass@j never falling as j grows."""
    run, out = reference["dir"], tmp_path / "passk.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "passk_bench.py"), "--model-dir",
                           str(run / "mlx_model"), "--test", str(run / "data" / "train.jsonl"), "--limit", "6",
                           "--k", "4", "--max-new-tokens", "12", "--adapters", f"base,{run / 'adapters'}",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"base", run.name}
    for summary in runs.values():
        assert summary["n"] == 6 and summary["k"] == 4
        assert summary["pass@1"] == pytest.approx(summary["sampled"])
        assert summary["pass@1"] <= summary["pass@2"] <= summary["pass@4"] <= 1
        assert 0 <= summary["all_right"] <= summary["flat"] <= 1
        assert sum(kind["n"] for kind in summary["by_kind"].values()) == 6
