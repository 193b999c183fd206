"""Tests for `eval` (daemon.evaluate): greedy generation on held-out problems with the base
model and the adapters, scoring (checked exactly with an injected generator), the JSON
record and the table, problem sources, and the command line through its parser."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest

from mathlora_daemon.cli import arguments
from mathlora_daemon.cli import evaluation as eval_cli
from mathlora_daemon.config import Config
from mathlora_daemon.demo.mathgen import write_demo_dataset
from mathlora_daemon.errors import InputError
from mathlora_daemon.evaluation.evaluate import (
    STOP_MARKERS,
    cut_at_markers,
    evaluate,
    format_table,
    load_problems,
    reference_answer,
)
from mathlora_daemon.rundir import RunDir

N_TEST = 10
SUMMARY_KEYS = {"n", "correct", "accuracy", "format_ok", "format_compliance", "extracted", "mean_generated_tokens",
                "skipped", "seconds", "load_seconds", "by_kind", "problems_per_s"}
ITEM_KEYS = {"index", "problem", "kind", "reference", "predicted", "how", "correct", "format_ok", "tokens", "output"}


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """A run directory: the tiny demo model, the demo's test split and adapters with
    non-zero LoRA weights (so the adapters really change the model)."""
    from mlx_lm.tuner.lora import LoRALinear

    from mathlora_daemon.training.model import adapter_config, apply_lora, load_base, save_adapters

    run = tmp_path_factory.mktemp("eval") / "run"
    shutil.copytree(tiny_model_dir, run / "mlx_model")
    write_demo_dataset(run / "data", n_train=0, n_test=N_TEST, seed=0)
    cfg = Config()
    model, _, _ = load_base(run / "mlx_model")
    keys = apply_lora(model, cfg)
    key = mx.random.key(7)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):  # lora_b starts at zero: the adapters would be a no-op
            key, kb = mx.random.split(key)
            module.lora_b = 0.5 * mx.random.normal(module.lora_b.shape, key=kb)
    save_adapters(model, run / "adapters", adapter_config(cfg, len(model.layers), keys))
    return run


@pytest.fixture(scope="module")
def problems(run) -> list[dict]:
    return [json.loads(line) for line in (run / "data" / "test.jsonl").read_text().splitlines()]


def half_right(problems):
    """A generator that answers the even-numbered problems with their reference solution
    and the others with text holding no answer at all."""
    solutions = {p["problem"].strip(): (i, p["solution"]) for i, p in enumerate(problems)}
    calls = []

    def generate(model, tokenizer, prompt, max_tokens):
        calls.append(prompt)
        # The problem inside whichever prompt format wraps it (tutor text or chat template).
        index, solution = next(found for problem, found in solutions.items() if problem in prompt)
        return solution if index % 2 == 0 else "I am not sure what to do here."

    generate.calls = calls
    return generate


def parse(*argv):
    return arguments.parse(["eval", *argv])


# --- scoring ----------------------------------------------------------------------------------

def test_accuracy_and_format_are_exact_with_a_known_generator(run, problems):
    gen = half_right(problems)
    result = evaluate(run / "mlx_model", problems, None, 32, 0, generate_fn=gen, progress=False)
    summary = result["summary"]
    assert (summary["n"], summary["correct"], summary["format_ok"]) == (N_TEST, N_TEST // 2, N_TEST // 2)
    assert summary["accuracy"] == 0.5 and summary["format_compliance"] == 0.5
    assert summary["extracted"] == {"boxed": N_TEST // 2, "final_answer_line": 0, "last_number": 0,
                                    "none": N_TEST // 2}
    assert summary["skipped"] == 0
    assert len(gen.calls) == N_TEST
    assert all(call.endswith("### Solution:\n") for call in gen.calls)  # the training template's prompt
    for item, problem in zip(result["items"], problems):
        assert set(item) == ITEM_KEYS
        assert item["reference"] == problem["answer"]
        assert item["correct"] is (item["index"] % 2 == 0)
        assert item["predicted"] == (problem["answer"] if item["index"] % 2 == 0 else None)
    assert result["adapter_path"] is None


def test_reference_comes_from_the_solution_without_an_answer_field(run, problems):
    without_answer = [{"problem": p["problem"], "solution": p["solution"]} for p in problems]
    nothing = {"problem": "What is 1 + 1?", "solution": "No idea."}
    no_text = {"problem": "", "answer": "3"}
    result = evaluate(run / "mlx_model", without_answer + [nothing, no_text], None, 32, 0,
                      generate_fn=half_right(problems), progress=False)
    assert result["summary"]["accuracy"] == 0.5
    assert result["summary"]["skipped"] == 2
    assert [item["reference"] for item in result["items"]] == [p["answer"] for p in problems]


def test_limit_takes_the_first_problems(run, problems):
    result = evaluate(run / "mlx_model", problems, None, 32, 4, generate_fn=half_right(problems), progress=False)
    assert [item["index"] for item in result["items"]] == [0, 1, 2, 3]
    assert result["summary"]["n"] == 4 and result["summary"]["accuracy"] == 0.5


def test_token_count_from_a_generator_that_reports_it(run, problems):
    result = evaluate(run / "mlx_model", problems[:2], None, 32, 0,
                      generate_fn=lambda m, t, prompt, n: ("\\boxed{1}", 7), progress=False)
    assert [item["tokens"] for item in result["items"]] == [7, 7]
    assert result["summary"]["mean_generated_tokens"] == 7


def test_bad_inputs_are_input_errors(run, problems, tmp_path):
    with pytest.raises(InputError, match="max-new-tokens"):
        evaluate(run / "mlx_model", problems, None, 0, 0)
    with pytest.raises(InputError, match="no config.json"):
        evaluate(tmp_path, problems, None, 8, 0)
    with pytest.raises(InputError, match="adapters.safetensors"):
        evaluate(run / "mlx_model", problems, tmp_path, 8, 0)
    with pytest.raises(InputError, match="reference answer"):
        evaluate(run / "mlx_model", [{"problem": "p", "solution": "no answer here"}], None, 8, 0)


def test_generation_is_cut_at_a_new_template_section():
    text = "x = 4.\nThe final answer is $\\boxed{4}$." + STOP_MARKERS[0] + "\nSolve 2x = 2.\n\\boxed{1}"
    assert cut_at_markers(text) == "x = 4.\nThe final answer is $\\boxed{4}$."
    assert cut_at_markers("plain") == "plain"


def test_reference_answer():
    assert reference_answer({"answer": " 75 ", "solution": "\\boxed{74}"}) == "75"
    assert reference_answer({"answer": "", "solution": "so \\boxed{\\frac{1}{2}}"}) == "\\frac{1}{2}"
    assert reference_answer({"problem": "p"}) is None


# --- real generation, base and adapters, through the command line ----------------------------

def test_cli_runs_base_and_adapters_and_prints_json(run, tmp_path, capsys):
    out = tmp_path / "reports" / "eval.json"
    assert eval_cli.evaluate(parse("--run-dir", str(run), "--limit", "3", "--max-new-tokens", "12", "--json",
                            "--out", str(out))) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads(out.read_text())
    assert set(record) == {"model", "data", "limit", "max_new_tokens", "runs"}
    assert record["data"] == str(run / "data" / "test.jsonl")
    assert (record["limit"], record["max_new_tokens"]) == (3, 12)
    assert list(record["runs"]) == ["base", "adapters"]
    assert record["runs"]["base"]["adapter_path"] is None
    assert record["runs"]["adapters"]["adapter_path"] == str(run / "adapters")
    for result in record["runs"].values():
        assert set(result["summary"]) == SUMMARY_KEYS
        assert result["summary"]["n"] == 3
        assert 0 <= result["summary"]["accuracy"] <= 1
        assert all(set(item) == ITEM_KEYS and 1 <= item["tokens"] <= 12 for item in result["items"])
        correct = sum(item["correct"] for item in result["items"])
        assert result["summary"]["accuracy"] == correct / 3
    # Same problems, different weights: the adapters change what is generated.
    base, adapted = (record["runs"][k]["items"] for k in ("base", "adapters"))
    assert [i["problem"] for i in base] == [i["problem"] for i in adapted]
    assert [i["output"] for i in base] != [i["output"] for i in adapted]


def test_greedy_generation_is_deterministic(run, problems):
    first, second = (evaluate(run / "mlx_model", problems[:2], run / "adapters", 10, 0, progress=False)
                     for _ in range(2))
    assert [i["output"] for i in first["items"]] == [i["output"] for i in second["items"]]


def test_cli_table_and_no_base(run, problems, capsys):
    assert eval_cli.evaluate(parse("--run-dir", str(run), "--no-base"), generate_fn=half_right(problems)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(run / "data" / "test.jsonl")
    assert lines[1].split() == ["adapters"]
    assert lines[2].split() == ["accuracy", "50.0%"]
    assert lines[3].split() == ["format", "50.0%"]
    assert lines[4].split() == ["n", str(N_TEST)]


def test_table_layout():
    def summary(acc, fmt, n):
        return {"summary": {"accuracy": acc, "format_compliance": fmt, "n": n, "mean_generated_tokens": 81.25,
                            "seconds": 12.0}}

    table = format_table({"runs": {"base": summary(0.12, 0.3, 50), "adapters": summary(0.46, 0.98, 50)}})
    assert table.splitlines() == [
        "               base    adapters",
        "accuracy       12.0%   46.0%",
        "format         30.0%   98.0%",
        "n              50      50",
        "tokens         81.2    81.2",
        "seconds        12.0    12.0",
    ]


def test_cli_without_adapters_evaluates_the_base_only(run, problems, tmp_path, capsys):
    other = tmp_path / "run"
    other.mkdir()
    (other / "mathlora.toml").write_text(f'[model]\npath = "{run / "mlx_model"}"\n')
    args = parse("--run-dir", str(other), "--data", str(run / "data" / "test.jsonl"), "--json")
    assert eval_cli.evaluate(args, generate_fn=half_right(problems)) == 0
    captured = capsys.readouterr()
    assert list(json.loads(captured.out)["runs"]) == ["base"]
    assert "evaluating the base model only" in captured.err
    with pytest.raises(InputError, match="nothing to evaluate"):
        eval_cli.evaluate(parse("--run-dir", str(other), "--no-base", "--data", str(run / "data" / "test.jsonl")))
    with pytest.raises(InputError, match="no adapters.safetensors"):
        eval_cli.evaluate(parse("--run-dir", str(other), "--adapter-path", str(tmp_path)))
    with pytest.raises(InputError, match="no held-out problems"):
        eval_cli.evaluate(parse("--run-dir", str(other)))
    with pytest.raises(InputError, match="unknown key"):
        eval_cli.evaluate(parse("--run-dir", str(other), "--set", "data.nope=1"))


# --- problem sources ---------------------------------------------------------------------------

def test_parquet_file_with_the_configs_field_names(run, problems, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": [p["problem"] for p in problems],
                             "worked": [p["solution"] for p in problems],
                             "big": ["x" * 100] * len(problems)}), tmp_path / "held.parquet")
    cfg = Config().data
    cfg.problem_field, cfg.solution_field = "question", "worked"
    described, loaded = load_problems("held.parquet", RunDir(tmp_path), cfg)
    assert described == "held.parquet"
    assert [(p["problem"], p["solution"], p["answer"]) for p in loaded] == [
        (p["problem"], p["solution"], None) for p in problems]
    assert loaded[0]["label"] == "held.parquet#1"
    result = evaluate(run / "mlx_model", loaded, None, 8, 0, generate_fn=half_right(problems), progress=False)
    assert result["summary"]["accuracy"] == 0.5


def test_missing_local_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_problems("nope.jsonl", RunDir(tmp_path), Config().data)
    with pytest.raises(InputError, match="hub:owner/name"):
        load_problems("owner/name", RunDir(tmp_path), Config().data)


def test_hub_dataset_through_datasets(monkeypatch, tmp_path, problems):
    import datasets

    calls = []

    def fake_load(name, subset, split, streaming):
        calls.append((name, subset, split, streaming))
        if name == "broken/set":
            raise ValueError("no such split")
        return iter([{"problem": p["problem"], "solution": p["solution"], "answer": p["answer"]} for p in problems])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    described, loaded = load_problems("hub:HuggingFaceH4/MATH-500", RunDir(tmp_path), Config().data, limit=4)
    assert described == "hub:HuggingFaceH4/MATH-500 (test)"
    assert [p["answer"] for p in loaded] == [p["answer"] for p in problems[:4]]
    assert calls == [("HuggingFaceH4/MATH-500", None, "test", True)]
    with pytest.raises(InputError, match="could not be loaded: no such split"):
        load_problems("hub:broken/set", RunDir(tmp_path), Config().data)
    with pytest.raises(InputError, match="expected hub:<dataset id>"):
        load_problems("hub:", RunDir(tmp_path), Config().data)


# --- batched generation, the recorded format, the final eval ------------------------------------

def test_batched_greedy_answers_as_one_at_a_time_does(run, problems):
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mathlora_daemon.evaluation.evaluate import _load_model, batched_greedy
    from mathlora_daemon.training.template import PromptFormat

    model, tokenizer = _load_model(run / "mlx_model", run / "adapters")
    fmt = PromptFormat.of("chat", tokenizer)
    prompts = [fmt.prompt_ids(p["problem"]) for p in problems[:6]]
    batched = batched_greedy(model, tokenizer, prompts, max_tokens=24, batch_size=4)
    for prompt, (text, tokens) in zip(prompts, batched):
        alone = "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens=24,
                                                        sampler=make_sampler(temp=0.0)))
        assert text == alone and 1 <= tokens <= 24


def test_every_problem_kind_is_scored_apart(run, problems):
    result = evaluate(run / "mlx_model", problems, None, 32, 0, generate_fn=half_right(problems), progress=False)
    by_kind = result["summary"]["by_kind"]
    assert set(by_kind) == {p["kind"] for p in problems}
    assert sum(k["n"] for k in by_kind.values()) == N_TEST
    assert sum(k["correct"] for k in by_kind.values()) == result["summary"]["correct"]
    assert any("accuracy / format" in line for line in format_table({"runs": {"base": result}}).splitlines())


def test_the_adapters_format_is_the_one_they_record(run, tmp_path):
    from mathlora_daemon.evaluation.evaluate import recorded_template

    config = json.loads((run / "adapters" / "adapter_config.json").read_text())
    other = tmp_path / "adapters"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({**config, "prompt_format": {"template": "chat"}}))
    assert recorded_template(other, "tutor") == "chat"
    assert recorded_template(run / "adapters", "tutor") == "tutor"  # nothing recorded: the run's setting
    assert recorded_template(None, "chat") == "chat"


def test_final_eval_switches_the_adapters_off_for_the_base_and_back_on(run, problems):
    from mathlora_daemon.evaluation.evaluate import _load_model, final_eval

    model, tokenizer = _load_model(run / "mlx_model", run / "adapters")
    report = final_eval(model, tokenizer, problems, 4, "chat", max_new_tokens=12)
    assert report["n"] == 4 and set(report) == {"n", "base", "adapters", "seconds"}
    base_model, _ = _load_model(run / "mlx_model", None)
    alone = evaluate(run / "mlx_model", problems[:4], None, 12, 0, progress=False, template="chat")
    assert report["base"]["correct"] == alone["summary"]["correct"]
    assert report["base"]["mean_generated_tokens"] == alone["summary"]["mean_generated_tokens"]
    with_adapters = evaluate(run / "mlx_model", problems[:4], run / "adapters", 12, 0, progress=False,
                             template="chat")
    assert report["adapters"]["mean_generated_tokens"] == with_adapters["summary"]["mean_generated_tokens"]
