"""The demo's shipped base model and the code that made it: the splits it was kept apart
from, the files and skill it ships with, and a (tiny, CPU) build from scratch and on from
an existing model."""

from __future__ import annotations

import json
import stat

import pytest

from mathlora_daemon.demo.base_model import (
    BASE_DIR,
    BUILD_FILE,
    MODEL_FILES,
    N_TEST,
    N_TRAIN,
    build,
    copy_base,
    demo_splits,
)
from mathlora_daemon.demo.mathgen import problem_key


def test_demo_splits_are_deterministic_balanced_and_apart():
    train, test = demo_splits()
    assert len(train) == N_TRAIN and len(test) == N_TEST
    assert not {problem_key(r) for r in train} & {problem_key(r) for r in test}
    assert demo_splits() == (train, test)
    kinds = {r["kind"] for r in test}
    assert all(sum(r["kind"] == k for r in test) == N_TEST // len(kinds) for k in kinds)


def test_the_shipped_base_loads_and_its_record_matches_it():
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    model, tokenizer = load(str(BASE_DIR))
    record = json.loads((BASE_DIR / BUILD_FILE).read_text())
    assert record["parameters"] == sum(v.size for _, v in tree_flatten(model.parameters()))
    assert record["skill"]["own_format_accuracy"] >= 0.5  # what the demo's LoRA builds on
    assert record["skill"]["chat_format"] == 0.0  # it has never seen the chat format
    assert tokenizer.chat_template  # DeepSeek's, so data.template = "chat" works
    assert sum(p.stat().st_size for p in BASE_DIR.iterdir()) < 4_000_000


def test_copy_base_writes_the_model_files_user_only(tmp_path):
    out = copy_base(tmp_path / "mlx_model")
    assert sorted(p.name for p in out.iterdir()) == sorted(MODEL_FILES)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in out.iterdir())
    assert (out / "model.safetensors").read_bytes() == (BASE_DIR / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "model"
    record = build(out, seconds=0, max_steps=3, batch_size=4, warmup=1, vocab=400, eval_problems=2,
                   dims=dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), log=lambda m: None)
    return out, record


def test_build_writes_a_loadable_model_and_its_recipe(built):
    from mlx_lm.utils import load

    out, record = built
    load(str(out))
    assert json.loads((out / BUILD_FILE).read_text()) == record
    assert record["training"]["steps"] == 3 and record["stages"] == [] and record["init"] is None
    assert record["corpus"]["format"].endswith("Answer: <answer>")
    assert set(record["skill"]) >= {"own_format_accuracy", "chat_accuracy", "chat_format"}


def test_build_goes_on_from_a_model_and_keeps_its_tokenizer_and_history(built, tmp_path):
    first, first_record = built
    record = build(tmp_path / "more", seconds=0, max_steps=2, batch_size=4, warmup=1, eval_problems=2,
                   init=first, boxed=True, log=lambda m: None)
    assert (tmp_path / "more" / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    earlier = json.loads(json.dumps({k: v for k, v in first_record.items() if k != "stages"}))
    assert record["stages"] == [earlier] and record["init"] == str(first)  # the history, flat
    assert "boxed" in record["corpus"]["format"]
