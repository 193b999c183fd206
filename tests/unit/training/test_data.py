"""Tests for the data path: the prompt template (daemon.template), dataset sources and
rows (daemon.data), and chunking/encoding into tokens (daemon.prepare)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mathlora_daemon.config import DataConfig
from mathlora_daemon.errors import InputError
from mathlora_daemon.training import template
from mathlora_daemon.training.data import MAX_LISTED_SKIPS, RowStats, iter_rows, resolve_source
from mathlora_daemon.training.prepare import encode_example, split_chunks

# The product design (shared DESIGN.md, "Training defaults"): the prompt template, character for character.
DESIGN_TEMPLATE = (
    "You are a helpful math tutor. Solve the problem step by step and give the final answer at the end.\n"
    "\n"
    "### Problem:\n"
    "{problem}\n"
    "\n"
    "### Solution:\n"
    "{solution}"
)


def read(source, cfg: DataConfig) -> tuple[list[tuple[str, str, str]], RowStats]:
    stats = RowStats()
    return [tuple(row)[:3] for row in iter_rows(source, cfg, stats)], stats


def local_source(tmp_path, name: str, cfg_kwargs=None):
    cfg = DataConfig(name=name, **(cfg_kwargs or {}))
    return resolve_source(cfg, tmp_path), cfg


# --- template -------------------------------------------------------------------------

def test_template_text_is_exactly_design():
    assert template.TEMPLATE == DESIGN_TEMPLATE
    got = template.format_example("What is 2 + 2?", "2 + 2 = 4.\nThe final answer is $\\boxed{4}$.")
    assert got == (
        "You are a helpful math tutor. Solve the problem step by step and give the final answer at the end.\n\n"
        "### Problem:\nWhat is 2 + 2?\n\n### Solution:\n2 + 2 = 4.\nThe final answer is $\\boxed{4}$."
    )


def test_braces_in_data_survive():
    problem = "Compute {x} where f(x) = {{x}} and \\frac{1}{2}; also {0} and {problem}"
    solution = "So $\\boxed{42}$ and {solution} {}"
    text = template.format_example(problem, solution)
    assert problem in text and solution in text
    assert text.endswith("### Solution:\nSo $\\boxed{42}$ and {solution} {}")


def test_prompt_is_prefix_of_example():
    problem, solution = "Solve 3x = 12 for x.", "x = 4.\nThe final answer is $\\boxed{4}$."
    prompt = template.format_prompt(problem)
    example = template.format_example(problem, solution)
    assert example.startswith(prompt)
    assert example[len(prompt):] == solution
    assert prompt.endswith("### Solution:\n")


def test_surrounding_whitespace_is_stripped():
    assert template.format_example("  p \n", "\n s  ") == template.format_example("p", "s")
    assert template.format_prompt("\n p ") == template.format_prompt("p")


# --- the prompt format, through the tokenizer -------------------------------------------------

def test_chat_format_is_the_model_s_chat_template_with_deepseek_s_instruction(tiny_tokenizer):
    fmt = template.PromptFormat.of("chat", tiny_tokenizer)
    problem, solution = "What is 2 + 3?", "2 + 3 = 5.\nThe final answer is $\\boxed{5}$."
    prompt = fmt.prompt_text(problem)
    assert prompt == ("<s>User: What is 2 + 3?\nPlease reason step by step, and put your final answer within "
                      "\\boxed{}.\n\nAssistant:")
    ids, prompt_len = fmt.example(problem, solution)
    assert ids[:prompt_len] == fmt.prompt_ids(problem)  # exactly what generation feeds the model
    assert tiny_tokenizer.decode(ids[prompt_len:]) == " " + solution + "</s>"
    assert ids[-1] == tiny_tokenizer.eos_token_id and ids.count(tiny_tokenizer.eos_token_id) == 1
    assert fmt.describe()["template"] == "chat" and fmt.describe()["instruction"] == template.INSTRUCTION


def test_tutor_format_is_the_original_text_and_its_prompt_is_the_examples_prefix(tiny_tokenizer):
    fmt = template.PromptFormat.of("tutor", tiny_tokenizer)
    problem, solution = "Solve 3x = 12 for x.", "x = 4.\nThe final answer is $\\boxed{4}$."
    ids, prompt_len = fmt.example(problem, solution)
    assert tiny_tokenizer.decode(ids[:prompt_len]) == "<s>" + template.format_prompt(problem)
    assert tiny_tokenizer.decode(ids[prompt_len:]) == solution + "</s>"


def test_a_format_s_identity_changes_with_its_text(tiny_tokenizer):
    chat, tutor = (template.PromptFormat.of(t, tiny_tokenizer) for t in ("chat", "tutor"))
    assert chat.identity != tutor.identity and len(chat.identity) == 16
    assert chat.identity == template.PromptFormat.of("chat", tiny_tokenizer).identity


def test_chat_without_a_chat_template_is_refused_with_the_way_out():
    class NoTemplate:
        chat_template = None

    with pytest.raises(InputError, match='data.template = "tutor"') as info:
        template.PromptFormat.of("chat", NoTemplate())
    assert info.value.exit_code == 78


# --- resolve_source -----------------------------------------------------------------------

def test_relative_path_found_in_run_dir(tmp_path, write_jsonl, monkeypatch):
    run_dir, elsewhere = tmp_path / "run", tmp_path / "cwd"
    elsewhere.mkdir()
    path = write_jsonl(run_dir / "data" / "train.jsonl", [{"problem": "p", "solution": "s"}])
    write_jsonl(elsewhere / "data" / "train.jsonl", [{"problem": "other", "solution": "s"}])
    monkeypatch.chdir(elsewhere)
    source = resolve_source(DataConfig(name="data/train.jsonl"), run_dir)
    assert source.is_local
    assert source.files == (path.resolve(),)  # the run dir is looked at first


def test_relative_path_falls_back_to_cwd(tmp_path, write_jsonl, monkeypatch):
    path = write_jsonl(tmp_path / "cwd" / "train.jsonl", [{"problem": "p", "solution": "s"}])
    monkeypatch.chdir(tmp_path / "cwd")
    (tmp_path / "run").mkdir()
    assert resolve_source(DataConfig(name="train.jsonl"), tmp_path / "run").files == (path.resolve(),)


def test_absolute_path(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "abs" / "x.jsonl", [{"problem": "p", "solution": "s"}])
    assert resolve_source(DataConfig(name=str(path)), tmp_path / "run").files == (path.resolve(),)


@pytest.mark.parametrize("name", ["missing.jsonl", "data/missing.parquet", "./missing", "a/b/c"])
def test_missing_local_path_is_an_input_error(tmp_path, name):
    with pytest.raises(InputError) as info:
        resolve_source(DataConfig(name=name), tmp_path)
    assert name in str(info.value)
    assert "no such file or folder" in str(info.value)
    assert info.value.exit_code == 78


def test_folder_without_data_files_is_an_error(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("not data")
    with pytest.raises(InputError) as info:
        resolve_source(DataConfig(name="data"), tmp_path)
    assert "holds no .jsonl or .parquet file" in str(info.value)


def test_file_with_other_suffix_is_an_error(tmp_path):
    (tmp_path / "train.json").write_text("[]")
    with pytest.raises(InputError) as info:
        resolve_source(DataConfig(name="train.json"), tmp_path)
    assert "not a .jsonl or .parquet file" in str(info.value)


def test_folder_lists_data_files_sorted_recursively(tmp_path, write_jsonl):
    b = write_jsonl(tmp_path / "data" / "b.jsonl", [{"problem": "p", "solution": "s"}])
    a = write_jsonl(tmp_path / "data" / "a.jsonl", [{"problem": "p", "solution": "s"}])
    c = write_jsonl(tmp_path / "data" / "sub" / "c.jsonl", [{"problem": "p", "solution": "s"}])
    (tmp_path / "data" / "README.md").write_text("ignored")
    source = resolve_source(DataConfig(name="data"), tmp_path)
    assert source.files == tuple(sorted(p.resolve() for p in (a, b, c)))


@pytest.mark.parametrize("name", ["open-r1/OpenR1-Math-220k", "owner/name", "gsm8k"])
def test_hub_id_is_a_hub_source(tmp_path, name):
    source = resolve_source(DataConfig(name=name), tmp_path)
    assert not source.is_local
    assert source.name == name and source.files == ()


# --- iter_rows: jsonl -----------------------------------------------------------------

def test_jsonl_rows_in_order_with_labels(tmp_path, write_jsonl, math_rows):
    write_jsonl(tmp_path / "train.jsonl", math_rows)
    rows, stats = read(*local_source(tmp_path, "train.jsonl"))
    assert [(p, s) for _, p, s in rows] == [(r["problem"], r["solution"]) for r in math_rows]
    assert [label for label, _, _ in rows] == [f"train.jsonl:{i}" for i in range(1, len(math_rows) + 1)]
    assert (stats.rows, stats.used, stats.skipped) == (len(math_rows), len(math_rows), 0)


def test_broken_json_line_names_file_and_line(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "train.jsonl", [{"problem": "p", "solution": "s"}] * 3 + ['{"problem": "p", '])
    with pytest.raises(InputError) as info:
        read(*local_source(tmp_path, "train.jsonl"))
    assert str(path.resolve()) in str(info.value)
    assert "line 4" in str(info.value)
    assert info.value.exit_code == 78


def test_json_array_line_is_an_error(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "train.jsonl", [{"problem": "p", "solution": "s"}, '["p", "s"]'])
    with pytest.raises(InputError) as info:
        read(*local_source(tmp_path, "train.jsonl"))
    assert "train.jsonl" in str(info.value)
    assert "line 2 is a JSON list" in str(info.value)


def test_non_utf8_line_is_an_input_error(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "train.jsonl", [{"problem": "p", "solution": "s"}])
    with open(path, "ab") as fh:
        fh.write(b'{"problem": "caf\xe9", "solution": "s"}\n')
    with pytest.raises(InputError) as info:
        read(*local_source(tmp_path, "train.jsonl"))
    assert "train.jsonl" in str(info.value) and "line 2" in str(info.value)


def test_blank_lines_are_ignored_but_keep_line_numbers(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "train.jsonl", [{"problem": "p1", "solution": "s1"}, "", "   ",
                                           {"problem": "p2", "solution": "s2"}])
    rows, stats = read(*local_source(tmp_path, "train.jsonl"))
    assert rows == [("train.jsonl:1", "p1", "s1"), ("train.jsonl:4", "p2", "s2")]
    assert stats.rows == 2


def test_missing_or_empty_fields_are_skipped_and_counted(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "train.jsonl", [
        {"problem": "p1", "solution": "s1"},
        {"solution": "s2"},                      # 2: missing problem
        {"problem": "p3", "solution": ""},       # 3: empty solution
        {"problem": "   ", "solution": "s4"},    # 4: blank problem
        {"problem": "p5", "solution": None},     # 5: null solution
        {"problem": 6, "solution": "s6"},        # 6: not text
        {"problem": "p7", "solution": "s7"},
    ])
    rows, stats = read(*local_source(tmp_path, "train.jsonl"))
    assert [(p, s) for _, p, s in rows] == [("p1", "s1"), ("p7", "s7")]
    assert (stats.rows, stats.used, stats.skipped) == (7, 2, 5)
    assert stats.skipped_examples == [
        "train.jsonl:2 (missing 'problem')",
        "train.jsonl:3 (empty or non-text 'solution')",
        "train.jsonl:4 (empty or non-text 'problem')",
        "train.jsonl:5 (missing 'solution')",
        "train.jsonl:6 (empty or non-text 'problem')",
    ]


def test_only_the_first_skips_are_listed(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "train.jsonl", [{"problem": "p"}] * (MAX_LISTED_SKIPS + 4))
    rows, stats = read(*local_source(tmp_path, "train.jsonl"))
    assert rows == []
    assert stats.skipped == MAX_LISTED_SKIPS + 4
    assert len(stats.skipped_examples) == MAX_LISTED_SKIPS
    assert stats.skipped_examples[0] == "train.jsonl:1 (missing 'solution')"


def test_limit_stops_after_n_rows(tmp_path, write_jsonl, math_rows):
    write_jsonl(tmp_path / "train.jsonl", math_rows)
    rows, stats = read(*local_source(tmp_path, "train.jsonl", {"limit": 5}))
    assert [p for _, p, _ in rows] == [r["problem"] for r in math_rows[:5]]
    assert (stats.rows, stats.used) == (5, 5)


def test_limit_counts_skipped_rows_and_reads_no_further(tmp_path, write_jsonl):
    # limit = N uses only the first N rows: a broken line after them is never read.
    write_jsonl(tmp_path / "train.jsonl", [{"problem": "p1", "solution": "s1"}, {"problem": "p2"},
                                           {"problem": "p3", "solution": "s3"}, "{broken"])
    rows, stats = read(*local_source(tmp_path, "train.jsonl", {"limit": 3}))
    assert [p for _, p, _ in rows] == ["p1", "p3"]
    assert (stats.rows, stats.used, stats.skipped) == (3, 2, 1)


def test_rows_from_several_files_in_name_order(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "data" / "b.jsonl", [{"problem": "b1", "solution": "s"}])
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"problem": "a1", "solution": "s"}, {"problem": "a2", "solution": "s"}])
    rows, _ = read(*local_source(tmp_path, "data"))
    assert [(label, p) for label, p, _ in rows] == [("a.jsonl:1", "a1"), ("a.jsonl:2", "a2"), ("b.jsonl:1", "b1")]


# --- iter_rows: parquet ---------------------------------------------------------------

def write_parquet(path, columns: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_gives_the_same_rows_as_jsonl(tmp_path, write_jsonl, math_rows):
    write_jsonl(tmp_path / "train.jsonl", math_rows)
    write_parquet(tmp_path / "train.parquet", {"problem": [r["problem"] for r in math_rows],
                                                "solution": [r["solution"] for r in math_rows],
                                                "answer": [r["answer"] for r in math_rows]})
    from_jsonl, _ = read(*local_source(tmp_path, "train.jsonl"))
    from_parquet, stats = read(*local_source(tmp_path, "train.parquet"))
    assert [(p, s) for _, p, s in from_parquet] == [(p, s) for _, p, s in from_jsonl]
    assert from_parquet[0][0] == "train.parquet#1"
    assert from_parquet[-1][0] == f"train.parquet#{len(math_rows)}"
    assert (stats.rows, stats.used) == (len(math_rows), len(math_rows))


def test_parquet_custom_field_names(tmp_path, math_rows):
    write_parquet(tmp_path / "qa.parquet", {"question": [r["problem"] for r in math_rows],
                                             "answer": [r["solution"] for r in math_rows]})
    cfg_kwargs = {"problem_field": "question", "solution_field": "answer", "limit": 4}
    rows, stats = read(*local_source(tmp_path, "qa.parquet", cfg_kwargs))
    assert [(p, s) for _, p, s in rows] == [(r["problem"], r["solution"]) for r in math_rows[:4]]
    assert stats.rows == 4


def test_jsonl_custom_field_names(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "problem": "ignored"}])
    rows, _ = read(*local_source(tmp_path, "qa.jsonl", {"problem_field": "question", "solution_field": "answer"}))
    assert [(p, s) for _, p, s in rows] == [("q", "a")]


def test_parquet_missing_column_skips_rows_as_missing(tmp_path):
    write_parquet(tmp_path / "train.parquet", {"problem": ["p1", "p2", "p3"]})
    rows, stats = read(*local_source(tmp_path, "train.parquet"))
    assert rows == []
    assert (stats.rows, stats.skipped) == (3, 3)
    assert stats.skipped_examples[0] == "train.parquet#1 (missing 'solution')"


def test_parquet_nulls_are_skipped(tmp_path):
    write_parquet(tmp_path / "train.parquet", {"problem": ["p1", None, "p3"], "solution": ["s1", "s2", ""]})
    rows, stats = read(*local_source(tmp_path, "train.parquet"))
    assert [(p, s) for _, p, s in rows] == [("p1", "s1")]
    assert stats.skipped_examples == ["train.parquet#2 (missing 'problem')",
                                      "train.parquet#3 (empty or non-text 'solution')"]


def test_damaged_parquet_is_an_input_error(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError) as info:
        read(*local_source(tmp_path, "train.parquet"))
    assert "train.parquet" in str(info.value)
    assert "not a readable parquet file" in str(info.value)


# --- chunking and encoding --------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 5, 16, 17])
def test_short_sequence_is_unchanged(n):
    # up to max_seq_len + 1 tokens: max_seq_len model positions, max_seq_len targets
    ids = list(range(100, 100 + n))
    assert split_chunks(ids, 16) == [ids]


@pytest.mark.parametrize("n, max_len", [(18, 16), (31, 16), (32, 16), (33, 16), (34, 16), (100, 16), (1000, 37),
                                        (2049, 1024), (2050, 1024)])
def test_long_sequence_chunks_overlap_by_one_and_cover_every_target_once(n, max_len):
    ids = list(range(1000, 1000 + n))
    chunks = split_chunks(ids, max_len)
    assert len(chunks) > 1
    assert all(2 <= len(c) <= max_len + 1 for c in chunks)
    assert chunks[0][0] == ids[0]
    for prev, nxt in zip(chunks, chunks[1:]):
        assert prev[-1] == nxt[0]          # overlap of exactly one token
        assert len(prev) == max_len + 1    # a full chunk feeds the model exactly max_len positions
    targets = [t for c in chunks for t in c[1:]]
    assert targets == ids[1:]              # every token after the first is a target exactly once


def test_encode_example_adds_bos_and_eos(tiny_tokenizer):
    text = template.format_example("What is 2 + 3?", "5.\nThe final answer is $\\boxed{5}$.")
    ids = encode_example(tiny_tokenizer, text)
    assert tiny_tokenizer.bos_token_id is not None
    assert ids[0] == tiny_tokenizer.bos_token_id
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert ids.count(tiny_tokenizer.eos_token_id) == 1
    assert tiny_tokenizer.decode(ids[1:-1]) == text


class _FakeTokenizer:
    """Encodes one id per character; no BOS; EOS id 99."""

    eos_token_id = 99
    bos_token_id = None

    def __init__(self, eos_in_text: bool = False):
        self.eos_in_text = eos_in_text

    def encode(self, text):
        ids = [ord(c) for c in text]
        return ids + [99] if self.eos_in_text else ids


def test_encode_example_without_bos_and_without_double_eos():
    assert encode_example(_FakeTokenizer(), "ab") == [97, 98, 99]
    assert encode_example(_FakeTokenizer(eos_in_text=True), "ab") == [97, 98, 99]


def test_answer_only_rows_get_the_final_answer_line_as_their_solution(tmp_path):
    """GSM8K-style rows (a problem and an answer, a number or text): usable for SFT (the
    answer line) and for GRPO (the answer is the reference); data.answer_field names it."""
    rows = [{"problem": "What is 6 x 7?", "answer": 42}, {"problem": "Simplify 2/4.", "final": "1/2"},
            {"problem": "No answer here."}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source, cfg = local_source(tmp_path, "a.jsonl")
    got, stats = read(source, cfg)
    assert got[0][2] == "The final answer is $\\boxed{42}$." and stats.skipped == 2
    source, cfg = local_source(tmp_path, "a.jsonl", {"answer_field": "final"})
    got, stats = read(source, cfg)
    assert [r[2] for r in got] == ["The final answer is $\\boxed{1/2}$."] and stats.skipped == 2
