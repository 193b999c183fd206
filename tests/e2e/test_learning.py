"""Training that measurably improves the model, through the real daemon process:
validation loss at every checkpoint, the best adapters kept and selected, early stopping,
the learning-rate schedule (sized by the budget, continued across a SIGKILL), the loss on
the solution only, the final eval and the morning report, and the chat template round
trip through mlx-lm (its `generate` and its server answer as ours does).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from mathlora_checkpoints.store import list_checkpoints, load_checkpoint
from mathlora_daemon.training.lr import LRSchedule
from mathlora_daemon.training.template import INSTRUCTION

from runs import ENV, TOTAL, cli, copy, events, finish, free_ports, sha, start, wait_for

PEAK, WARMUP, FLOOR = 2e-3, 3, 0.1  # runs.tiny_config's schedule: cosine, 3 warmup steps, floor 10%


def lr_of(step: int, length: int) -> float:
    """The learning rate the tiny run's logged step `step` (1-based) must have used."""
    return LRSchedule("cosine", PEAK, WARMUP, FLOOR, length)(step - 1)


def adapters_sha(ckpt: Path) -> str:
    return sha(load_checkpoint(ckpt)[1]["adapters"])


def token_cache(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """The run's training cache: (each sequence's length, its prompt's length)."""
    (meta,) = [p for p in (run / "cache").glob("*/meta.json")]
    split = meta.parent / "train"
    offsets = np.load(split / "offsets.npy")
    return np.diff(offsets), np.load(split / "prompt_lens.npy")


# --- validation, best adapters, the morning report ------------------------------------------

def test_validation_loss_is_measured_before_training_and_at_every_checkpoint(reference):
    run = reference["dir"]
    evals = events(run, "train.eval")
    assert [e["step"] for e in evals] == list(range(0, TOTAL + 1, 4))  # the base model, then every checkpoint
    validation = len((run / "data" / "test.jsonl").read_text().splitlines())
    assert all(e["sequences"] == validation and e["tokens"] > 0 and e["seconds"] >= 0 for e in evals)
    base = evals[0]["val_loss"]
    assert all(e["base_val_loss"] == base for e in evals)
    assert min(e["val_loss"] for e in evals[1:]) < base  # the adapters predict held-out solutions better
    best = min(evals[1:], key=lambda e: (e["val_loss"], e["step"]))
    assert evals[-1]["best_step"] == best["step"] and evals[-1]["best_val_loss"] == best["val_loss"]

    # Each checkpoint carries its validation loss: in its trainer state and in the manifest.
    for info in list_checkpoints(run / "checkpoints"):
        state = json.loads((info.path / "trainer_state.json").read_text())
        logged = next(e["val_loss"] for e in evals if e["step"] == info.step)
        assert state["eval"]["loss"] == logged and info.eval_loss == logged
        assert [s for s, _ in state["eval"]["history"]] == list(range(0, info.step + 1, 4))
    listed = json.loads(cli("checkpoints", "list", "--json", run=run).stdout)["checkpoints"]
    assert {c["step"]: c["eval_loss"] for c in listed} == {i.step: i.eval_loss
                                                            for i in list_checkpoints(run / "checkpoints")}
    table = cli("checkpoints", "list", run=run).stdout
    assert f"eval_loss={evals[-1]['val_loss']:.4f}" in table


def test_status_of_a_finished_run_is_the_morning_report(reference):
    run = reference["dir"]
    evals = events(run, "train.eval")
    best = min(evals[1:], key=lambda e: (e["val_loss"], e["step"]))
    status = json.loads(cli("status", "--json", run=run).stdout)
    report = status["report"]
    assert report["adapters"] == str(run / "adapters") and report["steps"] == TOTAL
    assert report["base_val_loss"] == evals[0]["val_loss"] and report["best_val_loss"] == best["val_loss"]
    assert report["selected_step"] == best["step"]
    steps = events(run, "train.step")
    assert report["first_loss"] == steps[0]["loss"]  # of the whole run, not of its last segment
    text = cli("status", run=run).stdout
    assert f"val loss   {best['val_loss']:.4f} at step {best['step']} vs {evals[0]['val_loss']:.4f}" in text
    assert f"train loss {steps[0]['loss']:.4f} at step 1 ->" in text
    done = events(run, "train.done")[-1]
    assert done["first_loss"] == steps[0]["loss"] and done["selected_step"] == best["step"]


@pytest.fixture(scope="session")
def odd_validation(template_dir, tmp_path_factory) -> Path:
    """The tiny run with a high learning rate, validated on text unlike its training data
    (nonsense words): the validation loss falls, then rises, so the best step is not the
    last. Deterministic on the CPU: the same losses every run."""
    run = copy(template_dir, tmp_path_factory.mktemp("odd") / "run")
    rng = random.Random(0)
    rows = [{"problem": f"Say something odd, number {i}.",
             "solution": " ".join("".join(rng.choice("qwzxjkv") for _ in range(rng.randint(2, 7))) for _ in range(20))}
            for i in range(8)]
    (run / "data" / "odd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


ODD = ("--set", "train.learning_rate=0.02", "--set", "data.validation_name=data/odd.jsonl")


def _best_and_last(run: Path) -> tuple[dict, dict]:
    evals = events(run, "train.eval")[1:]
    return min(evals, key=lambda e: (e["val_loss"], e["step"])), evals[-1]


def test_the_best_checkpoint_is_kept_and_becomes_the_adapters(odd_validation, tmp_path):
    run = copy(odd_validation, tmp_path / "run")
    finish(start(run, *ODD))
    best, last = _best_and_last(run)
    assert best["step"] < last["step"] and best["val_loss"] < last["val_loss"]  # the case this test is about
    kept = {i.step: i.path for i in list_checkpoints(run / "checkpoints")}
    assert best["step"] in kept and len(kept) == 3  # retention: the newest 2 and the best
    assert sha(run / "adapters" / "adapters.safetensors") == adapters_sha(kept[best["step"]])
    selected = json.loads((run / "adapters" / "adapter_config.json").read_text())["selected"]
    assert selected["step"] == best["step"] and selected["rule"] == "lowest validation loss"
    assert f"step {best['step']} of the {TOTAL} trained, lowest validation loss" in cli("status", run=run).stdout


def test_select_last_keeps_the_last_adapters(odd_validation, tmp_path):
    run = copy(odd_validation, tmp_path / "run")
    finish(start(run, *ODD, "--set", "train.select=last"))
    kept = {i.step: i.path for i in list_checkpoints(run / "checkpoints")}
    assert sha(run / "adapters" / "adapters.safetensors") == adapters_sha(kept[TOTAL])
    selected = json.loads((run / "adapters" / "adapter_config.json").read_text())["selected"]
    assert selected["rule"] == "last" and selected["step"] == TOTAL
    assert f"step {TOTAL} of the {TOTAL} trained, the last" in cli("status", run=run).stdout


def test_early_stopping_ends_the_run_after_evaluations_without_a_new_best(odd_validation, tmp_path):
    run = copy(odd_validation, tmp_path / "run")
    finish(start(run, *ODD, "--set", "train.early_stop_evals=2"))
    evals = events(run, "train.eval")[1:]
    best = min(evals, key=lambda e: (e["val_loss"], e["step"]))
    # It stopped at the second evaluation after the best, not at the end of the run.
    assert evals[-1]["step"] == best["step"] + 8 < TOTAL
    assert [e["best"] for e in evals if e["step"] > best["step"]] == [False, False]
    (stop,) = events(run, "train.early_stop")
    assert stop["step"] == evals[-1]["step"] and "no new best validation loss in 2 evaluations" in stop["reason"]
    assert events(run, "daemon.stop")[-1]["exit_code"] == 0
    assert max(e["step"] for e in events(run, "train.step")) == evals[-1]["step"]
    kept = {i.step: i.path for i in list_checkpoints(run / "checkpoints")}
    assert sha(run / "adapters" / "adapters.safetensors") == adapters_sha(kept[best["step"]])
    status = json.loads(cli("status", "--json", run=run).stdout)
    assert status["state"] == "finished" and "early stop" in status["reason"]
    finish(start(run, *ODD, "--set", "train.early_stop_evals=2"))  # started again (launchd): it stays finished
    assert max(e["step"] for e in events(run, "train.step")) == evals[-1]["step"]


# --- the schedule ---------------------------------------------------------------------------

def test_every_step_uses_the_cosine_schedule_of_the_whole_run(reference):
    steps = events(reference["dir"], "train.step")
    for e in steps:
        assert e["lr"] == pytest.approx(lr_of(e["step"], TOTAL), rel=1e-6), e
    lrs = [e["lr"] for e in steps]
    assert lrs[:WARMUP] == pytest.approx([PEAK / 3, 2 * PEAK / 3, PEAK], rel=1e-6)  # warmup
    assert lrs[-1] == pytest.approx(lr_of(TOTAL, TOTAL)) and lrs[-1] < 1.05 * FLOOR * PEAK


def test_a_budget_bound_schedule_is_fixed_once_and_continues_across_a_sigkill(template_dir, tmp_path):
    """100 epochs (800 steps) do not fit a 20-second budget: after 20 timed steps the daemon
    sizes the schedule to the steps the budget allows and keeps that length in its
    checkpoints; killed and started again, it goes on with the same schedule and has
    decayed when the budget runs out."""
    run = copy(template_dir, tmp_path / "run")
    args = ("--set", "train.epochs=100", "--set", "daemon.budget_hours=0.0055")
    total = 100 * TOTAL // 4
    wait_for(lambda: events(run, "train.schedule") and [c for c in list_checkpoints(run / "checkpoints")
                                                          if c.step > events(run, "train.schedule")[0]["step"]],
             proc := start(run, *args), "a checkpoint after the schedule is fixed")
    proc.kill()
    proc.wait(timeout=60)
    (fixed,) = events(run, "train.schedule")
    # Fixed once 20 steps are timed: the budget is charged at step boundaries, so at step 21.
    assert fixed["source"] == "budget" and fixed["step"] == 21 and 21 < fixed["length"] < total
    first_start = events(run, "train.step")

    finish(start(run, *args))
    assert events(run, "train.schedule") == [fixed]  # not estimated again: the checkpoint carries it
    resumed_from = events(run, "resume")[-1]["from_step"]
    assert resumed_from > fixed["step"]
    state = json.loads((list_checkpoints(run / "checkpoints")[-1].path / "trainer_state.json").read_text())
    assert {k: state["schedule"][k] for k in ("length", "source")} == {"length": fixed["length"], "source": "budget"}
    for e in events(run, "train.step"):
        length = total if e["step"] <= fixed["step"] else fixed["length"]
        assert e["lr"] == pytest.approx(lr_of(e["step"], length), rel=1e-6), e
    redone = [e for e in events(run, "train.step")[len(first_start):] if e["step"] <= first_start[-1]["step"]]
    for e in redone:  # steps trained again after the kill: the very same losses
        assert e["loss"] == next(f["loss"] for f in first_start if f["step"] == e["step"])
    last = events(run, "train.step")[-1]
    assert events(run, "daemon.stop")[-1]["reason"].startswith("training budget")
    # The budget ended the run late in its schedule, not at its start (the estimate is a
    # measurement: the exact step depends on this machine's speed).
    assert last["step"] < total and last["lr"] < (PEAK + FLOOR * PEAK) / 2, (last, fixed)


# --- the loss on the solution ---------------------------------------------------------------

def test_the_loss_counts_solution_tokens_only_unless_told_otherwise(reference, template_dir, tmp_path):
    """train.step's `tokens` are the targets the loss averaged over: in an epoch, every
    sequence's solution tokens (mask_prompt, the default), or every next token."""
    lengths, prompts = token_cache(reference["dir"])
    assert (prompts > 0).all() and (prompts < lengths).all()
    epoch = [e["tokens"] for e in events(reference["dir"], "train.step") if e["step"] <= TOTAL // 4]
    assert sum(epoch) == int((lengths - prompts).sum())

    run = copy(template_dir, tmp_path / "run")
    finish(start(run, "--set", "train.mask_prompt=false", "--set", f"train.max_steps={TOTAL // 4}"))
    assert sum(e["tokens"] for e in events(run, "train.step")) == int((lengths - 1).sum())


# --- the final eval -------------------------------------------------------------------------

def test_final_eval_scores_base_and_adapters_and_status_shows_it(reference, tmp_path):
    run = copy(reference["dir"], tmp_path / "run")
    # A finished run restarted with a final eval asked for: no step, but the eval runs.
    finish(start(run, "--set", "train.final_eval=3"))
    (ev,) = events(run, "train.final_eval")
    assert ev["n"] == 3
    for side in ("base", "adapters"):
        s = ev[side]
        assert s["n"] == 3 and 0 <= s["correct"] <= 3 and 0 <= s["format_ok"] <= 3 and s["problems_per_s"] > 0
    text = cli("status", run=run).stdout
    assert (f"eval       3 validation problems: accuracy {100 * ev['base']['accuracy']:.1f}% -> "
            f"{100 * ev['adapters']['accuracy']:.1f}%") in text


# --- the chat template, through mlx-lm --------------------------------------------------------

PROBLEM = "What is 20% of 150?"


def _ours(run: Path) -> str:
    result = cli("generate", "--prompt", PROBLEM, "--temperature", "0", "--max-new-tokens", "20", run=run)
    assert result.returncode == 0, result.stderr
    return result.stdout.rstrip("\n")


def test_mlx_lm_generate_answers_as_ours_with_the_recorded_chat_format(reference):
    run = reference["dir"]
    config = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert config["prompt_format"]["template"] == "chat" and config["prompt_format"]["instruction"] == INSTRUCTION
    theirs = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(run / "mlx_model"),
                             "--adapter-path", str(run / "adapters"), "--prompt", f"{PROBLEM}\n{INSTRUCTION}",
                             "--max-tokens", "20", "--temp", "0"], capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert theirs.returncode == 0, theirs.stderr
    text = theirs.stdout.split("==========\n")[1].rstrip("\n")
    assert text and text == _ours(run)


def _chat(port: int, content: str):
    """A poll for wait_for: one greedy chat completion of `content` from the server on
    `port` (its JSON answer), or None while it is not listening yet."""
    body = json.dumps({"messages": [{"role": "user", "content": content}], "temperature": 0,
                       "max_tokens": 20}).encode()

    def ask():
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except OSError:
            return None

    return ask


def test_mlx_lm_server_answers_as_ours(reference):
    run = reference["dir"]
    (port,) = free_ports(1)
    server = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(run / "mlx_model"),
                               "--adapter-path", str(run / "adapters"), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        answer = wait_for(_chat(port, f"{PROBLEM}\n{INSTRUCTION}"), server, "mlx_lm server to answer")
        assert answer["choices"][0]["message"]["content"] == _ours(run)
    finally:
        server.kill()
        server.wait(timeout=30)


def test_serve_answers_the_bare_problem_as_generate_does(reference):
    """`serve`: mlx-lm's server with the run's adapters and the recorded format, so a
    client sends only the problem (the instruction is added as in training)."""
    run = reference["dir"]
    (port,) = free_ports(1)
    server = subprocess.Popen([sys.executable, "-m", "mathlora_daemon", "serve", "--run-dir", str(run),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=ENV)
    try:
        answer = wait_for(_chat(port, PROBLEM), server, "mathlora-daemon serve to answer")
        assert answer["choices"][0]["message"]["content"] == _ours(run)
    finally:
        server.terminate()
        server.wait(timeout=30)
    banner = server.stderr.read()
    assert f"on http://127.0.0.1:{port}/v1" in banner and "chat prompt format" in banner, banner
    assert "Traceback" not in banner, banner[-2000:]
