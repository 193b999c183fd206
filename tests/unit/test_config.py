"""Tests for config.py: the product design's defaults, TOML + --set overrides, and the
errors a user sees for unknown keys, wrong types and out-of-range values."""

from __future__ import annotations

import dataclasses

import pytest

from mathlora_daemon.config import Config, config_to_dict, load_config, parse_override, to_toml
from mathlora_daemon.errors import EXIT_CONFIG, InputError

# The product design's "Config file", plus the daemon's own additions: train.max_steps,
# daemon.checkpoint_every_steps and the memory and crash-loop guard settings.
DESIGN_DEFAULTS = {
    "model": {"name": "deepseek-ai/deepseek-math-7b-instruct", "path": "mlx_model", "quantize_bits": 0},
    "data": {"name": "open-r1/OpenR1-Math-220k", "subset": "all", "split": "train", "problem_field": "problem",
             "solution_field": "solution", "max_seq_len": 1024, "limit": 0, "template": "chat",
             "solution_source": "solution", "long_rows": "chunk", "validation_fraction": 0.01, "answer_field": "answer",
             "pack": False, "validation_name": ""},
    "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
    "train": {"epochs": 1, "batch_size": 1, "grad_accumulation_steps": 8, "learning_rate": 1e-5, "seed": 0,
              "max_steps": 0, "group_by_length": False, "mask_prompt": True, "lr_schedule": "cosine", "warmup_steps": 0,
              "min_lr_ratio": 0.1, "weight_decay": 0.0, "max_grad_norm": 1.0, "eval_sequences": 64, "select": "best",
              "early_stop_evals": 0, "final_eval": 0, "method": "sft", "grad_checkpoint": False},
    "daemon": {"budget_hours": 16.0, "segment_minutes": 10.0, "keep_checkpoints": 3, "checkpoint_every_steps": 0,
               "window": "", "prevent_sleep": True, "pause_on_battery": True,
               "memory_warning_available_gb": 2.0, "memory_critical_available_gb": 0.5, "memory_limit_gb": 0.0,
               "memory_limit_from_plan": True,
               "memory_plan": "enforce", "max_crash_restarts": 3},
    # GRPO (issue 21): DeepSeekMath's beta 0.04 and TRL's defaults otherwise; DAPO's token-level loss.
    "rl": {"group_size": 8, "prompts_per_step": 4, "max_new_tokens": 512, "temperature": 1.0, "top_p": 1.0,
           "beta": 0.04, "clip_epsilon": 0.2, "updates_per_batch": 1, "loss": "dapo", "format_weight": 0.1,
           "skip_flat_groups": 0, "init_adapters": "", "sft_share": 0.5, "learning_rate": 0.0},
    "report": {"tensorboard": False, "wandb_project": "", "mlflow_uri": ""},
    "notify": {"urls": [], "command": "", "events": ["finished", "budget_exhausted", "failed", "stopped"],
               "macos": True},
}


def config_error(tmp_path, toml: str | None = None, overrides=()) -> str:
    path = None
    if toml is not None:
        path = tmp_path / "mathlora.toml"
        path.write_text(toml)
    with pytest.raises(InputError) as info:
        load_config(path, list(overrides))
    assert info.value.exit_code == EXIT_CONFIG == 78
    return str(info.value)


# --- defaults -----------------------------------------------------------------------

def test_defaults_equal_design():
    cfg = Config()
    assert config_to_dict(cfg) == DESIGN_DEFAULTS
    assert cfg.lora_scale == 2.0
    assert isinstance(cfg.lora.alpha, float) and isinstance(cfg.train.learning_rate, float)


def test_missing_file_gives_defaults(tmp_path):
    assert load_config(tmp_path / "nope.toml") == Config()
    assert load_config(None) == Config()
    assert not (tmp_path / "nope.toml").exists()  # loading never writes


def test_empty_file_gives_defaults(tmp_path):
    (tmp_path / "mathlora.toml").write_text("# nothing set\n")
    assert load_config(tmp_path / "mathlora.toml") == Config()


def test_defaults_are_not_shared_between_configs():
    a, b = Config(), Config()
    a.lora.targets.append("k_proj")
    assert b.lora.targets == ["q_proj", "v_proj"]


# --- TOML + overrides -----------------------------------------------------------------

def test_toml_values_are_used(tmp_path):
    (tmp_path / "mathlora.toml").write_text(
        '[lora]\nrank = 16\nalpha = 8\ntargets = ["q_proj", "k_proj", "v_proj"]\n'
        '[train]\nlearning_rate = 2e-4\nbatch_size = 2\n'
        '[daemon]\nwindow = "22:00-07:00"\nprevent_sleep = false\n'
    )
    cfg = load_config(tmp_path / "mathlora.toml")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (16, 8.0, ["q_proj", "k_proj", "v_proj"])
    assert isinstance(cfg.lora.alpha, float)  # an int is accepted for a float key and stored as float
    assert cfg.lora_scale == 0.5
    assert (cfg.train.learning_rate, cfg.train.batch_size) == (2e-4, 2)
    assert (cfg.daemon.window, cfg.daemon.prevent_sleep) == ("22:00-07:00", False)
    assert cfg.train.grad_accumulation_steps == 8  # untouched keys keep their defaults


def test_override_wins_over_toml(tmp_path):
    (tmp_path / "mathlora.toml").write_text("[lora]\nrank = 16\n[train]\nepochs = 3\n")
    cfg = load_config(tmp_path / "mathlora.toml", ["lora.rank=4"])
    assert cfg.lora.rank == 4
    assert cfg.train.epochs == 3


def test_later_override_wins():
    assert load_config(None, ["lora.rank=4", "lora.rank=32"]).lora.rank == 32


@pytest.mark.parametrize("text, key, value", [
    ("train.learning_rate=2e-4", "train.learning_rate", 2e-4),
    ("lora.rank=16", "lora.rank", 16),
    ("daemon.prevent_sleep=false", "daemon.prevent_sleep", False),
    ('lora.targets=["q_proj", "k_proj"]', "lora.targets", ["q_proj", "k_proj"]),
    ("data.name=train.jsonl", "data.name", "train.jsonl"),
    ('model.name="quoted/name"', "model.name", "quoted/name"),
    ("daemon.window=22:00-07:00", "daemon.window", "22:00-07:00"),
    (" lora.rank = 16 ", "lora.rank", 16),
    ("data.name=a=b.jsonl", "data.name", "a=b.jsonl"),
])
def test_parse_override(text, key, value):
    got_key, got_value = parse_override(text)
    assert got_key == key
    assert got_value == value and type(got_value) is type(value)


@pytest.mark.parametrize("override, section, key, value", [
    ("train.learning_rate=2e-4", "train", "learning_rate", 2e-4),
    ("train.learning_rate=1", "train", "learning_rate", 1.0),
    ("lora.dropout=0.05", "lora", "dropout", 0.05),
    ("daemon.pause_on_battery=false", "daemon", "pause_on_battery", False),
    ('lora.targets=["q_proj", "k_proj", "v_proj", "o_proj"]', "lora", "targets",
     ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("data.name=train.jsonl", "data", "name", "train.jsonl"),
    ("data.name=data/train.parquet", "data", "name", "data/train.parquet"),
    ("model.name=2024", "model", "name", "2024"),
    ("model.name=true", "model", "name", "true"),
    ("daemon.window=22:00-07:00", "daemon", "window", "22:00-07:00"),
    ('daemon.window=""', "daemon", "window", ""),
    ("model.quantize_bits=4", "model", "quantize_bits", 4),
])
def test_set_overrides_reach_the_config(override, section, key, value):
    got = getattr(getattr(load_config(None, [override]), section), key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", ["lora.rank", "rank=8", "=8", "train.learning_rate 2e-4"])
def test_override_without_equals_or_section(text):
    with pytest.raises(InputError) as info:
        parse_override(text)
    assert repr(text) in str(info.value)
    assert "section.key=value" in str(info.value)
    assert info.value.exit_code == 78
    with pytest.raises(InputError):
        load_config(None, [text])


# --- malformed and unknown ------------------------------------------------------------

def test_malformed_toml_names_file_and_line(tmp_path):
    msg = config_error(tmp_path, "[lora]\nrank = 8\nalpha = \n")
    assert str(tmp_path / "mathlora.toml") in msg
    assert "line 3" in msg


def test_config_path_that_is_a_directory_is_an_input_error(tmp_path):
    with pytest.raises(InputError) as info:
        load_config(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert info.value.exit_code == 78


def test_non_utf8_file_is_an_input_error(tmp_path):
    path = tmp_path / "mathlora.toml"
    path.write_bytes(b'[model]\nname = "\xff\xfe"\n')
    with pytest.raises(InputError) as info:
        load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("override, suggestion", [
    ("lora.rnak=8", "'lora.rank'"),
    ("train.rank=8", "'lora.rank'"),
    ("train.learnig_rate=1e-4", "'train.learning_rate'"),
    ("daemon.budget=3", "'daemon.budget_hours'"),
])
def test_unknown_key_suggests_closest(tmp_path, override, suggestion):
    msg = config_error(tmp_path, overrides=[override])
    key = override.split("=")[0]
    assert f"unknown key '{key}'" in msg
    assert f"did you mean {suggestion}" in msg


def test_unknown_key_in_toml_names_file(tmp_path):
    msg = config_error(tmp_path, "[lora]\nrnak = 8\n")
    assert str(tmp_path / "mathlora.toml") in msg
    assert "unknown key 'lora.rnak'" in msg and "did you mean 'lora.rank'" in msg


def test_unknown_section(tmp_path):
    msg = config_error(tmp_path, "[lroa]\nrank = 8\n")
    assert "unknown section [lroa]" in msg
    assert "did you mean 'lora'" in msg
    for section in ("model", "data", "lora", "train", "daemon"):
        assert section in msg


def test_unknown_section_in_override(tmp_path):
    msg = config_error(tmp_path, overrides=["optim.rank=8"])
    assert "unknown key 'optim.rank'" in msg


def test_section_that_is_not_a_table(tmp_path):
    msg = config_error(tmp_path, "lora = 8\n")
    assert "'lora' must be a table" in msg


# --- types ------------------------------------------------------------------------------

@pytest.mark.parametrize("toml, key, shown, allowed", [
    ('[lora]\nrank = "8"\n', "lora.rank", '"8"', "an integer"),
    ("[lora]\nrank = true\n", "lora.rank", "true", "an integer"),
    ("[lora]\nrank = 8.0\n", "lora.rank", "8.0", "an integer"),
    ('[train]\nlearning_rate = "fast"\n', "train.learning_rate", '"fast"', "a number"),
    ("[train]\nlearning_rate = true\n", "train.learning_rate", "true", "a number"),
    ("[daemon]\nprevent_sleep = 1\n", "daemon.prevent_sleep", "1", "true or false"),
    ("[model]\nname = 7\n", "model.name", "7", "a string"),
    ('[lora]\ntargets = "q_proj"\n', "lora.targets", '"q_proj"', "a list of strings"),
    ("[lora]\ntargets = [1, 2]\n", "lora.targets", "[1, 2]", "a list of strings"),
])
def test_wrong_type_names_key_value_and_type(tmp_path, toml, key, shown, allowed):
    msg = config_error(tmp_path, toml)
    assert f"{key} = {shown} has the wrong type" in msg
    assert f"expected {allowed}" in msg


@pytest.mark.parametrize("override, shown, allowed", [
    ("lora.rank=eight", '"eight"', "an integer"),
    ("lora.rank=true", "true", "an integer"),
    ("lora.rank=8.5", "8.5", "an integer"),
    ("train.learning_rate=fast", '"fast"', "a number"),
])
def test_wrong_type_from_set(tmp_path, override, shown, allowed):
    msg = config_error(tmp_path, overrides=[override])
    key = override.split("=")[0]
    assert f"--set {override}" in msg
    assert f"{key} = {shown} has the wrong type: expected {allowed}" in msg


def test_int_accepted_for_float(tmp_path):
    (tmp_path / "mathlora.toml").write_text("[daemon]\nbudget_hours = 8\n[lora]\ndropout = 0\n")
    cfg = load_config(tmp_path / "mathlora.toml")
    assert cfg.daemon.budget_hours == 8.0 and isinstance(cfg.daemon.budget_hours, float)
    assert cfg.lora.dropout == 0.0 and isinstance(cfg.lora.dropout, float)


# --- ranges -----------------------------------------------------------------------------

@pytest.mark.parametrize("override, shown, allowed", [
    ("lora.rank=0", "0", "from 1 to"),
    ("lora.rank=-8", "-8", "from 1 to"),
    ("train.learning_rate=0", "0.0", "> 0"),
    ("train.learning_rate=-1e-5", "-1e-05", "> 0"),
    ("data.max_seq_len=15", "15", "from 16 to"),
    ("lora.dropout=1.0", "1.0", "[0, 1)"),
    ("lora.dropout=-0.1", "-0.1", "[0, 1)"),
    ("daemon.window=25:00-07:00", '"25:00-07:00"', '"HH:MM-HH:MM"'),
    ("daemon.window=22:00-22:00", '"22:00-22:00"', "different start and end"),
    ("daemon.window=10pm-7am", '"10pm-7am"', '"HH:MM-HH:MM"'),
    ("lora.targets=[]", "[]", "non-empty list of distinct"),
    ('lora.targets=["q_proj", "q_proj"]', '["q_proj", "q_proj"]', "non-empty list of distinct"),
    ('lora.targets=[" "]', '[" "]', "non-empty list"),
    ("model.quantize_bits=3", "3", "one of 0, 4, 8"),
    ("train.batch_size=0", "0", "from 1 to"),
    ("train.grad_accumulation_steps=0", "0", "from 1 to"),
    ("train.epochs=0", "0", "from 1 to"),
    ("lora.alpha=0", "0.0", "> 0"),
    ("daemon.budget_hours=0", "0.0", "> 0"),
    ("daemon.keep_checkpoints=0", "0", "from 1 to"),
    ("data.limit=-1", "-1", ">= 0"),
    ('data.name=""', '""', "non-empty"),
])
def test_out_of_range_names_key_value_and_allowed(tmp_path, override, shown, allowed):
    msg = config_error(tmp_path, overrides=[override])
    key = override.split("=")[0]
    assert f"{key} = {shown} is not allowed" in msg
    assert allowed in msg


def test_boundaries_that_are_allowed():
    cfg = load_config(None, ["lora.rank=1", "data.max_seq_len=16", "lora.dropout=0.99",
                             "train.learning_rate=1", "daemon.window=00:00-23:59", "model.quantize_bits=8"])
    assert (cfg.lora.rank, cfg.data.max_seq_len, cfg.lora.dropout) == (1, 16, 0.99)
    assert cfg.daemon.window == "00:00-23:59" and cfg.model.quantize_bits == 8


def test_all_errors_reported_together(tmp_path):
    msg = config_error(
        tmp_path,
        '[lora]\nrank = 0\nrnak = 3\n[train]\nlearning_rate = "x"\n[bogus]\na = 1\n',
        overrides=["data.max_seq_len=8", "daemon.window=25:00-07:00"],
    )
    for part in ("lora.rank = 0 is not allowed", "unknown key 'lora.rnak'", 'train.learning_rate = "x" has the wrong type',
                 "unknown section [bogus]", "data.max_seq_len = 8 is not allowed",
                 'daemon.window = "25:00-07:00" is not allowed'):
        assert part in msg, part
    assert msg.count("\n") >= 6  # one line per problem


def test_valid_override_fixes_bad_toml_value(tmp_path):
    (tmp_path / "mathlora.toml").write_text("[lora]\nrank = 0\n")
    assert load_config(tmp_path / "mathlora.toml", ["lora.rank=4"]).lora.rank == 4


# --- to_toml ----------------------------------------------------------------------------

def test_to_toml_round_trips_defaults(tmp_path):
    path = tmp_path / "mathlora.toml"
    path.write_text(to_toml(Config(), comment="written by a test\nsecond line"))
    assert path.read_text().startswith("# written by a test\n# second line\n")
    assert load_config(path) == Config()


def test_to_toml_round_trips_every_changed_value(tmp_path):
    cfg = load_config(None, [
        'model.name="C:\\\\models\\\\deep \\"seek\\""', "model.quantize_bits=4",
        "data.name=data/train set.jsonl", "data.max_seq_len=333", "data.limit=10",
        "lora.rank=16", "lora.alpha=7.5", "lora.dropout=0.1", 'lora.targets=["q_proj", "o_proj", "gate_proj"]',
        "train.learning_rate=3.3e-7", "train.seed=4294967295", "train.max_steps=5",
        "daemon.budget_hours=0.25", "daemon.window=22:00-07:00", "daemon.prevent_sleep=false",
    ])
    assert cfg.model.name == 'C:\\models\\deep "seek"'
    cfg.data.subset = "sub\tset é ∑ 🙂 \x7f"  # any string a user could have in a file or path
    path = tmp_path / "mathlora.toml"
    path.write_text(to_toml(cfg), encoding="utf-8")
    back = load_config(path)
    assert back == cfg
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)


def test_memory_critical_above_warning_is_refused():
    with pytest.raises(InputError) as err:
        load_config(None, ["daemon.memory_warning_available_gb=1", "daemon.memory_critical_available_gb=2"])
    assert "daemon.memory_critical_available_gb = 2.0" in str(err.value)
    assert "at most daemon.memory_warning_available_gb (1.0)" in str(err.value)


def test_grad_checkpoint_with_lora_dropout_is_refused(tmp_path):
    # Recomputing a layer in the backward pass would draw other dropout masks than the forward's.
    message = config_error(tmp_path, overrides=["train.grad_checkpoint=true", "lora.dropout=0.05"])
    assert "train.grad_checkpoint = true needs lora.dropout = 0" in message and "0.05" in message
    assert load_config(None, ["train.grad_checkpoint=true"]).train.grad_checkpoint is True


# --- one declaration per key -------------------------------------------------------------

def test_the_reference_is_the_one_the_code_generates():
    """docs/reference.md: the configuration table from the declarations, every command's
    options from the parser (regenerate: python -m mathlora_daemon.cli.reference)."""
    from mathlora_daemon.cli.reference import render
    from mathlora_daemon.config import KEYS, reference_table

    from runs import ROOT

    text = (ROOT / "docs" / "reference.md").read_text()
    assert text == render(), "docs/reference.md drifted: `python -m mathlora_daemon.cli.reference > docs/reference.md`"
    assert reference_table() in text and all(f"`{key}`" in text for key in KEYS)
    for command in ("run", "status", "logs", "checkpoints list", "install", "eval", "export", "serve", "demo"):
        assert f"### {command}\n" in text
    assert "__" not in text  # no argparse dest leaks into a usage line


def test_readme_is_short_and_points_to_the_guide_and_the_reference():
    from runs import ROOT

    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for where in ("docs/guide.md", "docs/reference.md", "docs/DESIGN.md"):
        assert where in readme and (ROOT / where).is_file()


def test_each_key_declares_help_allowed_values_and_its_change_rule():
    from mathlora_daemon.config import FINGERPRINT_KEYS, KEYS, RELOADABLE

    for name, f in KEYS.items():
        assert f.metadata["help"] and f.metadata["allowed"], name
        assert not (f.metadata["reload"] and f.metadata["fingerprint"]), name  # hot-reloading math would be wrong
    # Only the daemon's own settings change while running; no training setting does.
    assert RELOADABLE and all(name.startswith("daemon.") for name in RELOADABLE)
    assert {"lora.rank", "train.learning_rate", "data.max_seq_len", "train.group_by_length"} <= set(FINGERPRINT_KEYS)
    assert "train.grad_checkpoint" not in FINGERPRINT_KEYS and "train.epochs" not in FINGERPRINT_KEYS


# --- issue 20: files and values a user really had ----------------------------------------------

def test_a_byte_order_mark_is_not_toml_and_is_ignored(tmp_path):
    (tmp_path / "mathlora.toml").write_bytes(b"\xef\xbb\xbf[train]\nepochs = 3\n")
    assert load_config(tmp_path / "mathlora.toml").train.epochs == 3


def test_a_dangling_symlink_names_the_file_and_where_it_points(tmp_path):
    (tmp_path / "mathlora.toml").symlink_to(tmp_path / "gone.toml")
    with pytest.raises(InputError) as info:
        load_config(tmp_path / "mathlora.toml")
    msg = str(info.value)
    assert str(tmp_path / "mathlora.toml") in msg and "symbolic link" in msg and "gone.toml" in msg, msg


def test_a_fifo_is_refused_without_reading_it(tmp_path):
    import os

    os.mkfifo(tmp_path / "mathlora.toml")  # reading it would block forever
    with pytest.raises(InputError, match="not a regular file"):
        load_config(tmp_path / "mathlora.toml")


def test_a_string_longer_than_the_limit_is_refused_naming_the_key_and_shown_short(tmp_path):
    from mathlora_daemon.config import MAX_STRING

    msg = config_error(tmp_path, overrides=["data.name=" + "x" * 120_000])
    assert "data.name" in msg and "120000 characters" in msg and f"at most {MAX_STRING}" in msg, msg[:500]
    assert len(msg) < 600, len(msg)
    assert load_config(None, ["data.name=" + "x" * MAX_STRING]).data.name == "x" * MAX_STRING
    msg = config_error(tmp_path, toml=f'[lora]\ntargets = ["{"q" * 5000}"]\n')
    assert "lora.targets" in msg and "at most" in msg and len(msg) < 600, msg[:500]
