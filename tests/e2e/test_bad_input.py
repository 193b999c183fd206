"""Every subcommand against a battery of bad inputs, through the real CLI.

Each row of CASES sets up a run directory (a copy of the untrained tiny run, a copy of
the finished one, or no directory at all), damages one thing in it, runs one command
and asserts the contract for bad input:

* no Python traceback in stdout or stderr;
* the exit code is one the contract allows (0 ok, 2 argparse usage, 75 temporary
  failure, 78 configuration or input error; the row narrows it);
* the message names the offending thing (the row's patterns, all of them);
* nothing the user owns changed: config, data, model, checkpoints, adapters, caches
  (every file except logs/, state/ and daemon.lock hashes the same before and after),
  except the paths a row documents as legitimately written.

The last tests pin messages the issue calls out, as the fixed behaviour reads.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from runs import cli, snapshot

CONTRACT = {0, 2, 75, 78}
NOT_FOUND = r"(?i)(no such|does not exist|not found|missing|not a directory)"
UNWRITABLE = r"(?i)(permission|read-only|not writable|cannot (write|create)|not a directory|is a directory|unwritable)"
BROKEN_LINE = ('{"problem": "a", "solution": "b"}\n{"problem": "c", "solution": "d"}\n'
               '{"problem": "e", "solution": \n')


# --- helpers ---------------------------------------------------------------------------------

def write(rel: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(run: Path) -> None:
        path = run / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return setup


def remove(rel: str) -> Callable[[Path], None]:
    def setup(run: Path) -> None:
        path = run / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return setup


def as_file(rel: str) -> Callable[[Path], None]:
    """Put a regular file where the daemon expects a directory (root can't write below it either)."""
    def setup(run: Path) -> None:
        path = run / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        path.write_text("not a directory\n")
    return setup


def as_dir(rel: str) -> Callable[[Path], None]:
    """Put a directory where the daemon expects a regular file."""
    def setup(run: Path) -> None:
        path = run / rel
        if path.exists():
            path.unlink()
        path.mkdir()
        (path / "keep").write_text("x")
    return setup


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(run: Path) -> None:
        for s in setups:
            s(run)
    return setup


def newest_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*"))[-1]


def damage_newest_manifest(run: Path) -> None:
    (newest_checkpoint(run) / "MANIFEST.json").write_text("{ this is not json")


def truncate_newest_weights(run: Path) -> None:
    path = newest_checkpoint(run) / "adapters.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def damage_cache_meta(run: Path) -> None:
    metas = sorted((run / "cache").glob("*/meta.json"))
    assert metas, "the finished run has a token cache"
    for meta in metas:
        meta.write_text("garbage {")


def keep_only_newest_checkpoint(run: Path) -> None:
    for ckpt in sorted((run / "checkpoints").glob("step-*"))[:-1]:
        shutil.rmtree(ckpt)


def can_write(directory: Path) -> bool:
    probe = directory / ".probe-write"
    try:
        probe.write_text("x")
    except OSError:
        return False
    probe.unlink()
    return True


def read_only(run: Path) -> None:
    """A run directory the user cannot write: chmod 0o500 on it and on the directories in
    it the daemon writes. Root ignores modes, so when a probe write still succeeds the
    daemon's write locations are also made unwritable for root: logs/, state/ and cache/
    become regular files and daemon.lock a directory (writes below them fail with
    ENOTDIR/EISDIR whoever runs them)."""
    for sub in ("logs", "state", "cache", "checkpoints", "adapters"):
        if (run / sub).is_dir():
            (run / sub).chmod(0o500)
    run.chmod(0o500)
    if can_write(run):  # running as root
        run.chmod(0o700)
        for sub in ("logs", "state", "cache"):
            (run / sub).chmod(0o700) if (run / sub).is_dir() else None
            as_file(sub)(run)
        as_dir("daemon.lock")(run)
        run.chmod(0o500)


# --- the table -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    base: str  # template (untrained tiny run) | trained (finished) | missing | below-file | is-file
    argv: tuple[str, ...]  # "{run}" and "{tmp}" are replaced; --run-dir {run} is appended
    codes: frozenset[int]
    expect: tuple[str, ...]  # regexes ("{run}", "{tmp}" replaced, escaped) that must all be in the output
    setup: Callable[[Path], None] | None = None
    writes: tuple[str, ...] = ()  # path prefixes the command may legitimately change (documented per row)
    run_dir_arg: bool = True
    timeout: float = 240
    extra: dict = field(default_factory=dict)


def case(id, base, argv, codes, *expect, setup=None, writes=(), run_dir_arg=True, timeout=240) -> Case:
    codes = frozenset([codes] if isinstance(codes, int) else codes)
    return Case(id, base, tuple(argv), codes, tuple(expect), setup, tuple(writes), run_dir_arg, timeout)


EVAL_FAST = ("--limit", "1", "--max-new-tokens", "4", "--no-base")

CASES = [
    # --- a --run-dir that does not exist (a typo): say so, create nothing -------------------
    case("status-missing-rundir", "missing", ["status"], {0, 78}, "typo", NOT_FOUND),
    case("logs-missing-rundir", "missing", ["logs"], 78, "typo", NOT_FOUND),
    case("run-missing-rundir", "missing", ["run"], 78, "typo", NOT_FOUND),
    case("prepare-missing-rundir", "missing", ["prepare"], 78, "typo", NOT_FOUND),
    case("checkpoints-list-missing-rundir", "missing", ["checkpoints", "list"], 78, "typo", NOT_FOUND),
    case("checkpoints-prune-missing-rundir", "missing", ["checkpoints", "prune"], 78, "typo", NOT_FOUND),
    case("generate-missing-rundir", "missing", ["generate", "--prompt", "1+1?"], 78, "typo", NOT_FOUND),
    case("eval-missing-rundir", "missing", ["eval", *EVAL_FAST], 78, "typo", NOT_FOUND),
    case("plot-missing-rundir", "missing", ["plot"], 78, "typo", NOT_FOUND),
    case("export-missing-rundir", "missing", ["export", "--format", "peft"], 78, "typo", NOT_FOUND),
    case("fuse-missing-rundir", "missing", ["fuse"], 78, "typo", NOT_FOUND),
    case("pause-missing-rundir", "missing", ["pause"], 78, "typo", NOT_FOUND),
    case("install-print-missing-rundir", "missing", ["install", "--print", "--system", "systemd"], 78, "typo",
         NOT_FOUND),

    # --- a run directory that cannot be written -------------------------------------------------
    case("run-readonly-rundir", "template", ["run"], 78, UNWRITABLE, setup=read_only),
    case("prepare-readonly-rundir", "template", ["prepare"], 78, UNWRITABLE, setup=read_only),
    case("checkpoints-prune-readonly-rundir", "trained", ["checkpoints", "prune", "--keep", "1"], 78, UNWRITABLE,
         setup=read_only),
    case("run-rundir-below-a-file", "below-file", ["run"], 78, "afile", r"(?i)not a directory|no such"),
    case("status-rundir-is-a-file", "is-file", ["status"], 78, "afile", r"(?i)not a directory"),
    case("run-state-is-a-file", "template", ["run"], 78, r"state", UNWRITABLE, setup=as_file("state")),
    case("run-logs-is-a-file", "template", ["run"], 78, r"logs", UNWRITABLE, setup=as_file("logs")),
    case("run-lock-is-a-directory", "template", ["run"], {75, 78}, r"daemon\.lock", setup=as_dir("daemon.lock")),
    case("prune-lock-is-a-directory", "trained", ["checkpoints", "prune", "--keep", "1"], {75, 78}, r"daemon\.lock",
         setup=as_dir("daemon.lock")),
    # pause/resume/stop with no daemon running exit 1, documented like `checkpoints verify`'s 1:
    # an answer for scripts ("nothing to resume"), not a crash.
    case("resume-state-is-a-file", "template", ["resume"], {1}, r"no daemon", setup=as_file("state")),

    # --- garbage in mathlora.toml ----------------------------------------------------------------
    case("run-toml-not-toml", "template", ["run"], 78, r"mathlora\.toml", r"line \d",
         setup=write("mathlora.toml", "this is = = not toml [\n")),
    case("prepare-toml-empty", "template", ["prepare"], {75, 78}, r"data\.name|mathlora\.toml|train",
         setup=write("mathlora.toml", "")),
    case("run-toml-wrong-type", "template", ["run"], 78, r"train\.batch_size",
         setup=write("mathlora.toml", '[train]\nbatch_size = "four"\n')),
    case("prepare-toml-unknown-key", "template", ["prepare"], 78, r"lora\.rnak",
         setup=write("mathlora.toml", "[lora]\nrnak = 4\n")),
    case("run-toml-unknown-section", "template", ["run"], 78, r"trian",
         setup=write("mathlora.toml", "[trian]\nepochs = 1\n")),
    case("checkpoints-list-toml-binary", "trained", ["checkpoints", "list"], 78, r"mathlora\.toml",
         setup=write("mathlora.toml", b"\xff\xfe\x00garbage\x00")),
    case("eval-config-missing", "trained", ["eval", "--config", "{tmp}/nope.toml", *EVAL_FAST], 78, r"--config",
         "nope.toml"),

    # --- garbage data ------------------------------------------------------------------------------
    case("prepare-broken-json-line", "template", ["prepare"], 78, r"train\.jsonl", r"line 3",
         setup=write("data/train.jsonl", BROKEN_LINE)),
    case("run-empty-train-file", "template", ["run"], 78, r"train\.jsonl", setup=write("data/train.jsonl", "")),
    case("prepare-train-file-missing", "template", ["prepare"], 78, r"train\.jsonl", NOT_FOUND,
         setup=remove("data/train.jsonl")),
    case("prepare-train-file-binary", "template", ["prepare"], 78, r"train\.jsonl",
         setup=write("data/train.jsonl", b"\x89PNG\r\n\x1a\n\x00\xff\xfe garbage\n")),
    case("run-validation-file-broken", "template", ["run"], 78, r"test\.jsonl",
         setup=write("data/test.jsonl", BROKEN_LINE)),

    # --- a damaged base model ----------------------------------------------------------------------
    case("prepare-model-config-garbage", "template", ["prepare"], 78, r"config\.json",
         setup=write("mlx_model/config.json", "not json at all")),
    case("run-model-weights-missing", "template", ["run"], 78, r"mlx_model|safetensors",
         setup=remove("mlx_model/model.safetensors")),
    case("generate-model-weights-garbage", "trained", ["generate", "--prompt", "1+1?", "--max-new-tokens", "2"], 78,
         r"model\.safetensors", setup=write("mlx_model/model.safetensors", b"\x00" * 64)),
    case("prepare-tokenizer-garbage", "template", ["prepare"], 78, r"tokenizer",
         setup=write("mlx_model/tokenizer.json", "{ nope")),

    # --- damaged adapters -------------------------------------------------------------------------
    case("generate-adapters-garbage", "trained", ["generate", "--prompt", "1+1?", "--max-new-tokens", "2"], 78,
         r"adapters\.safetensors", setup=write("adapters/adapters.safetensors", b"garbage" * 10)),
    case("eval-adapters-garbage", "trained", ["eval", *EVAL_FAST], 78, r"adapters\.safetensors",
         setup=write("adapters/adapters.safetensors", b"garbage" * 10)),
    case("export-adapters-garbage", "trained", ["export", "--format", "peft"], 78, r"adapters\.safetensors",
         setup=write("adapters/adapters.safetensors", b"garbage" * 10)),
    case("fuse-adapters-garbage", "trained", ["fuse"], 78, r"adapters\.safetensors",
         setup=write("adapters/adapters.safetensors", b"garbage" * 10)),
    case("generate-adapter-config-garbage", "trained", ["generate", "--prompt", "1+1?", "--max-new-tokens", "2"],
         78, r"adapter_config\.json", setup=write("adapters/adapter_config.json", "[1, 2")),
    case("export-no-adapters", "template", ["export", "--format", "peft"], 78, r"adapters", NOT_FOUND),
    case("fuse-adapter-path-missing", "trained", ["fuse", "--adapter-path", "{tmp}/nope"], 78, r"nope", NOT_FOUND),

    # --- damaged checkpoints ------------------------------------------------------------------------
    case("checkpoints-list-manifest-garbage", "trained", ["checkpoints", "list"], {0, 78},
         r"(?i)manifest|invalid|damaged|unreadable", setup=damage_newest_manifest),
    # `verify` documents exit 1 ("exit 1 when any fails", for scripts): a result, not a crash.
    case("checkpoints-verify-manifest-garbage", "trained", ["checkpoints", "verify"], {0, 1, 78},
         r"(?i)manifest|invalid", setup=damage_newest_manifest),
    case("checkpoints-verify-weights-truncated", "trained", ["checkpoints", "verify"], {0, 1, 78},
         r"(?i)invalid.*adapters\.safetensors|adapters\.safetensors.*(size|sha|invalid)",
         setup=truncate_newest_weights),
    # The run may fall back to the older intact checkpoint and finish: it then rewrites
    # checkpoints/ and adapters/ (legitimate). It must name the damaged one either way.
    case("run-manifest-garbage", "trained", ["run"], {0, 75, 78}, r"step-0*32|MANIFEST",
         setup=damage_newest_manifest, writes=("checkpoints", "adapters")),
    case("checkpoints-prune-keep-0", "trained", ["checkpoints", "prune", "--keep", "0"], 78, r"--keep"),

    # --- damaged state, log, cache ----------------------------------------------------------------
    case("status-status-json-garbage", "trained", ["status"], {0, 78}, r"status\.json",
         setup=write("state/status.json", "{ garbage")),
    case("logs-log-garbage", "trained", ["logs"], {0, 78}, r"not a json line|daemon\.jsonl",
         setup=write("logs/daemon.jsonl", b"\xff\xfe\x00 not a json line\n{broken\n")),
    case("plot-log-garbage", "trained", ["plot"], {0, 78}, r"daemon\.jsonl",
         setup=write("logs/daemon.jsonl", b"\xff\xfe\x00 not a json line\n{broken\n")),
    case("plot-no-log", "template", ["plot"], 78, r"(?i)daemon\.jsonl|no log"),
    case("logs-event-no-log", "template", ["logs", "--event", "train.step"], {0, 78}, r"(?i)daemon\.jsonl|no log"),
    # A damaged token cache is the daemon's to rebuild (it is derived from data/): writes cache/.
    case("prepare-cache-meta-garbage", "trained", ["prepare"], {0, 78}, r"(?i)cache|meta\.json",
         setup=damage_cache_meta, writes=("cache",)),

    # --- wrong types and huge values through --set -----------------------------------------------
    case("run-set-batch-size-negative", "template", ["run", "--set", "train.batch_size=-1"], 78,
         r"train\.batch_size"),
    case("prepare-set-batch-size-string", "template", ["prepare", "--set", 'train.batch_size="x"'], 78,
         r"train\.batch_size"),
    case("run-set-learning-rate-huge", "template", ["run", "--set", "train.learning_rate=1e99"], 78,
         r"train\.learning_rate"),
    case("prepare-set-max-seq-len-huge", "template", ["prepare", "--set", f"data.max_seq_len={10 ** 12}"], 78,
         r"data\.max_seq_len"),
    case("run-set-budget-negative", "template", ["run", "--set", "daemon.budget_hours=-5"], 78,
         r"daemon\.budget_hours"),
    case("run-set-rank-zero", "template", ["run", "--set", "lora.rank=0"], 78, r"lora\.rank"),
    case("run-set-epochs-float", "template", ["run", "--set", "train.epochs=1.5"], 78, r"train\.epochs"),
    case("run-set-template-nonsense", "template", ["run", "--set", "data.template=nonsense"], 78,
         r"data\.template", "nonsense"),
    case("generate-set-rank-huge", "trained", ["generate", "--prompt", "1+1?", "--set", f"lora.rank={10 ** 20}"],
         78, r"lora\.rank"),
    case("run-set-without-equals", "template", ["run", "--set", "train.batch_size"], {2, 78},
         r"train\.batch_size"),
    case("install-set-window-garbage", "template", ["install", "--print", "--system", "systemd", "--set",
                                                     "daemon.window=whenever"], 78, r"daemon\.window"),

    # --- usage errors (argparse: exit 2) ---------------------------------------------------------
    case("run-unknown-flag", "template", ["run", "--frobnicate"], 2, r"--frobnicate"),
    case("status-unknown-flag", "template", ["status", "--frobnicate"], 2, r"--frobnicate"),
    case("checkpoints-unknown-action", "trained", ["checkpoints", "frobnicate"], 2, r"frobnicate"),
    case("export-format-nope", "trained", ["export", "--format", "nope"], 2, r"nope"),
    case("generate-no-prompt", "trained", ["generate"], 2, r"--prompt"),
    case("logs-level-bogus", "trained", ["logs", "--level", "bogus"], 2, r"bogus"),
    case("convert-quantize-3", "template", ["convert", "--quantize", "3"], 2, r"--quantize"),
    case("launch-no-hosts", "template", ["launch"], 2, r"--hosts"),

    # --- bad option values -------------------------------------------------------------------------
    case("generate-max-new-tokens-0", "trained", ["generate", "--prompt", "1+1?", "--max-new-tokens", "0"], 78,
         r"--max-new-tokens"),
    case("generate-max-new-tokens-negative", "trained", ["generate", "--prompt", "1+1?", "--max-new-tokens", "-3"],
         78, r"--max-new-tokens"),
    case("generate-temperature-negative", "trained", ["generate", "--prompt", "1+1?", "--temperature", "-1"], 78,
         r"--temperature"),
    case("generate-adapter-path-missing", "trained", ["generate", "--prompt", "1+1?", "--adapter-path",
                                                      "{tmp}/nope"], 78, r"nope", NOT_FOUND),
    case("eval-limit-negative", "trained", ["eval", "--limit", "-1"], 78, r"--limit"),
    case("eval-data-missing", "trained", ["eval", "--data", "{tmp}/missing.jsonl", *EVAL_FAST], 78, r"--data",
         r"missing\.jsonl"),
    case("eval-data-empty", "trained", ["eval", "--data", "{tmp}/empty.jsonl", *EVAL_FAST], 78, r"empty\.jsonl",
         setup=lambda run: (run.parent / "empty.jsonl").write_text("")),
    case("eval-data-broken-line", "trained", ["eval", "--data", "{tmp}/broken.jsonl", *EVAL_FAST], 78,
         r"broken\.jsonl", r"line 3", setup=lambda run: (run.parent / "broken.jsonl").write_text(BROKEN_LINE)),
    case("eval-out-below-a-file", "trained", ["eval", "--out", "{run}/mathlora.toml/out.json", *EVAL_FAST], 78,
         r"--out|out\.json"),
    case("plot-out-below-a-file", "trained", ["plot", "--out", "{run}/mathlora.toml/loss.png"], 78,
         r"--out|loss\.png"),
    case("export-out-below-a-file", "trained", ["export", "--out", "{run}/mathlora.toml/peft"], 78,
         r"--out|peft"),
    case("logs-lines-negative", "trained", ["logs", "-n", "-1"], 78, r"--lines"),
    case("install-print-at-25-99", "template", ["install", "--print", "--system", "systemd", "--at", "25:99"],
         {2, 78}, r"25:99"),
    case("install-print-at-noon", "template", ["install", "--print", "--system", "systemd", "--at", "noon"],
         {2, 78}, r"noon"),
    case("install-print-hostfile-missing", "template", ["install", "--print", "--system", "systemd", "--hostfile",
                                                        "{tmp}/hosts.json"], 78, r"--hostfile", r"hosts\.json"),
    case("launch-hostfile-missing", "template", ["launch", "--hostfile", "{tmp}/hosts.json"], 78, r"hosts\.json"),
    case("launch-hostfile-garbage", "template", ["launch", "--hostfile", "{tmp}/hosts.json"], 78, r"hosts\.json",
         setup=lambda run: (run.parent / "hosts.json").write_text("{ not json")),
    case("convert-source-missing", "template", ["convert", "--source", "{tmp}/no-such-model", "--force"], {75, 78},
         r"no-such-model"),
    case("convert-source-garbage-gguf", "template", ["convert", "--source", "{tmp}/model.gguf", "--force"], 78,
         r"model\.gguf", setup=lambda run: (run.parent / "model.gguf").write_bytes(b"GGUF" + b"\x00" * 20)),
    case("demo-rundir-below-a-file", "below-file", ["demo", "--prepare-only"], 78, "afile",
         r"(?i)not a directory|no such|cannot"),

    # --- the ways out: serve, export --format gguf, fuse to GGUF --------------------------------
    case("serve-missing-rundir", "missing", ["serve"], 78, "typo", NOT_FOUND),
    case("serve-port-0", "trained", ["serve", "--port", "0"], 78, r"--port"),
    case("serve-port-huge", "trained", ["serve", "--port", "70000"], 78, r"--port 70000"),
    case("serve-adapter-path-missing", "trained", ["serve", "--adapter-path", "{tmp}/nope", "--port", "1"], 78,
         r"nope", NOT_FOUND),
    case("export-gguf-base-gguf-garbage", "trained", ["export", "--format", "gguf", "--base-gguf", "{tmp}/b.gguf"],
         78, r"b\.gguf", r"(?i)not a readable GGUF",
         setup=lambda run: (run.parent / "b.gguf").write_bytes(b"GGUF" + b"\x00" * 40)),
    case("export-gguf-base-gguf-missing", "trained", ["export", "--format", "gguf", "--base-gguf", "{tmp}/b.gguf"],
         78, r"--base-gguf", NOT_FOUND),
    case("export-gguf-not-llama", "trained", ["export", "--format", "gguf"], 78, r"qwen2", r"--format peft",
         setup=lambda run: (run / "mlx_model" / "config.json").write_text(
             (run / "mlx_model" / "config.json").read_text().replace('"llama"', '"qwen2"'))),
    case("fuse-gguf-without-a-base", "trained", ["fuse", "--gguf"], 78, r"--base-gguf"),

    # --- issue 20: what a user trying the product found ---------------------------------------
    case("status-run-dir-dash", "template", ["status", "--run-dir", "-dash"], 2, r"--run-dir=-dash", r"\./-dash",
         run_dir_arg=False),
    case("checkpoints-list-toml-bom", "template", ["checkpoints", "list"], 0, r"no checkpoints",
         setup=lambda run: (run / "mathlora.toml").write_bytes(b"\xef\xbb\xbf" + (run / "mathlora.toml").read_bytes())),
    case("prepare-toml-dangling-symlink", "template", ["prepare"], 78, r"mathlora\.toml", r"symbolic link",
         r"/nowhere/mathlora\.toml",
         setup=both(remove("mathlora.toml"), lambda run: (run / "mathlora.toml").symlink_to("/nowhere/mathlora.toml"))),
    case("prepare-config-is-a-directory", "template", ["prepare", "--config", "{tmp}/confdir"], 78, r"--config",
         r"confdir", r"is a directory", setup=lambda run: (run.parent / "confdir").mkdir()),
    case("prepare-config-is-a-fifo", "template", ["prepare", "--config", "{tmp}/fifo"], 78, r"--config", r"fifo",
         r"not a regular file", setup=lambda run: os.mkfifo(run.parent / "fifo"), timeout=60),
    case("prepare-config-dev-zero", "template", ["prepare", "--config", "/dev/zero"], 78, r"--config /dev/zero",
         r"not a regular file", timeout=60),
    case("generate-model-without-tokenizer", "trained", ["generate", "--prompt", "1+1?", "--max-new-tokens", "2"], 78,
         r"model\.path \S*mlx_model", r"no tokenizer files", r"tokenizer\.json",
         setup=remove("mlx_model/tokenizer.json")),
    case("status-takes-set-and-config", "trained", ["status", "--set", "train.epochs=2", "--config",
                                                    "{run}/mathlora.toml"], 0, r"(?i)finished"),
    case("logs-takes-set-and-config", "trained", ["logs", "-n", "1", "--set", "train.epochs=2", "--config",
                                                  "{run}/mathlora.toml"], 0, r"\S"),
    case("generate-prompt-longer-than-context", "trained", ["generate", "--prompt", "1+" * 20000], 78, r"--prompt",
         r"\d{5} tokens", r"context of 512 tokens", r"max_position_embeddings"),
    case("prepare-row-with-a-huge-prompt", "template", ["prepare"], 0, r"skipped 1 \(first: train\.jsonl:2 ",
         r"prompt alone is \d+ tokens", r"max_seq_len", setup=lambda run: _insert_row(
             run / "data" / "train.jsonl", 2, {"problem": "What is " + "1+" * 500_000 + "1?",
                                                "solution": "The final answer is $\\boxed{500001}$."}),
         writes=("cache",)),
    case("eval-limit-says-how-many", "template", ["eval", "--data", "{run}/data/train.jsonl", "--limit", "2",
                                                  "--max-new-tokens", "2"], 0,
         r"2 of 80 problems \(--limit 2; --limit 0 for all\)"),
]


def _insert_row(path: Path, line: int, row: dict) -> None:
    import json

    lines = path.read_text().splitlines()
    lines.insert(line - 1, json.dumps(row))
    path.write_text("\n".join(lines) + "\n")


def _ids() -> list[str]:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids are unique"
    return ids


def make_run(c: Case, tmp_path: Path, template_dir: Path, request) -> Path:
    if c.base == "template":
        run = tmp_path / "run"
        shutil.copytree(template_dir, run)
    elif c.base == "trained":
        run = tmp_path / "run"
        shutil.copytree(request.getfixturevalue("reference")["dir"], run)
    elif c.base == "missing":
        run = tmp_path / "missing" / "typo"
    elif c.base == "below-file":
        (tmp_path / "afile").write_text("a regular file\n")
        run = tmp_path / "afile" / "run"
    elif c.base == "is-file":
        run = tmp_path / "afile"
        run.write_text("a regular file\n")
    else:
        raise AssertionError(c.base)
    if c.setup is not None:
        c.setup(run)
    return run


def _restore_modes(root: Path) -> None:
    """Undo read_only() so pytest can clean up (and the snapshot can read)."""
    if root.is_dir() and not root.is_symlink():
        root.chmod(stat.S_IMODE(root.stat().st_mode) | 0o700)
        for sub in root.iterdir():
            if sub.is_dir() and not sub.is_symlink():
                sub.chmod(stat.S_IMODE(sub.stat().st_mode) | 0o700)


def _changed(before: dict[str, str], after: dict[str, str], writes: tuple[str, ...]) -> list[str]:
    keys = set(before) | set(after)
    return sorted(k for k in keys if before.get(k) != after.get(k)
                  and not any(k == w or k.startswith(w + os.sep) for w in writes))


def _fill(text: str, run: Path, tmp: Path) -> str:
    return text.replace("{run}", str(run)).replace("{tmp}", str(tmp))


@pytest.mark.parametrize("c", CASES, ids=_ids())
def test_bad_input(c: Case, tmp_path, template_dir, request):
    run = make_run(c, tmp_path, template_dir, request)
    argv = [_fill(a, run, tmp_path) for a in c.argv]
    before = snapshot(tmp_path)  # the run directory and everything beside it
    try:
        result = cli(*argv, run=run if c.run_dir_arg else None, timeout=c.timeout)
    finally:
        _restore_modes(run)
    output = result.stdout + result.stderr
    shown = f"$ mathlora-daemon {' '.join(argv)} --run-dir {run}\nexit {result.returncode}\n{output[-3000:]}"

    assert "Traceback" not in output, shown
    assert result.returncode in CONTRACT or result.returncode in c.codes, f"exit code outside the contract\n{shown}"
    assert result.returncode in c.codes, f"expected exit {sorted(c.codes)}\n{shown}"
    for pattern in c.expect:
        pattern = pattern.replace("{run}", re.escape(str(run))).replace("{tmp}", re.escape(str(tmp_path)))
        assert re.search(pattern, output), f"the message does not name the offending thing ({pattern!r})\n{shown}"

    after = snapshot(tmp_path)
    rel = run.relative_to(tmp_path)
    own = ("logs", "state", "daemon.lock", *c.writes)  # the daemon's bookkeeping, and what the row documents
    changed = _changed(before, after, tuple(str(rel / w) for w in own))
    assert not changed, f"changed {changed}\n{shown}"
    if c.base == "missing":  # a command given a typo'd run directory creates nothing there
        assert not (tmp_path / "missing").exists(), f"a typo'd --run-dir was created\n{shown}"


# --- messages the issue calls out (the fixed behaviour) -----------------------------------------

def test_status_of_a_missing_run_dir_says_it_does_not_exist(tmp_path):
    typo = tmp_path / "nonexistent" / "typo"
    result = cli("status", run=typo)
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert result.returncode in (0, 78), output
    assert "not started" not in output, output
    assert re.search(r"(?i)does not exist|no such (run )?directory", output), output
    assert str(typo) in output or "typo" in output, output
    assert not (tmp_path / "nonexistent").exists()


def test_prune_with_a_single_checkpoint_says_nothing_to_prune_and_how_many_are_kept(reference, tmp_path):
    run = shutil.copytree(reference["dir"], tmp_path / "run")
    keep_only_newest_checkpoint(run)
    (only,) = list((run / "checkpoints").glob("step-*"))
    before = snapshot(run)
    result = cli("checkpoints", "prune", "--keep", "1", run=run)
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert result.returncode == 0, output
    assert "no checkpoints" not in output, output  # there is one, and it is kept
    assert re.search(r"(?i)nothing to prune|pruned 0|none pruned|0 pruned", output), output
    assert re.search(r"(?i)\b1\b[^\n]*kept|kept[^\n]*\b1\b", output), output
    assert only.is_dir() and snapshot(run) == before


def test_eval_with_a_missing_data_file_names_the_option(reference, tmp_path):
    run = shutil.copytree(reference["dir"], tmp_path / "run")
    before = snapshot(run)
    result = cli("eval", "--data", str(tmp_path / "missing.jsonl"), *EVAL_FAST, run=run)
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert result.returncode == 78, output
    assert "--data" in output and "missing.jsonl" in output, output
    assert "data.name" not in output, output  # the config key was not what the user gave
    assert snapshot(run) == before


def test_a_broken_json_line_is_reported_without_a_stutter(template_dir, tmp_path):
    run = shutil.copytree(template_dir, tmp_path / "run")
    (run / "data" / "train.jsonl").write_text(BROKEN_LINE)
    result = cli("prepare", run=run)
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert result.returncode == 78, output
    assert "train.jsonl" in output and "line 3" in output, output
    assert not re.search(r"\bat at\b", output), output


# --- issue 20: the cases a table row cannot express ------------------------------------------

def _mount_full_tmpfs(mountpoint: Path) -> None:
    """Mount a 64 KiB tmpfs at mountpoint and fill it, so the next write fails with
    ENOSPC: a real full disk (root only; CI runs as root)."""
    import subprocess

    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        with open(mountpoint / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError as exc:
        assert exc.errno == 28, exc  # ENOSPC: the file system is full now


@pytest.mark.parametrize("command", [("export", "--format", "peft"), ("fuse",)], ids=["export-peft", "fuse"])
def test_export_and_fuse_onto_a_full_disk_exit_75_and_leave_nothing(reference, tmp_path, command):
    import subprocess

    run = shutil.copytree(reference["dir"], tmp_path / "run")
    full = tmp_path / "full"
    _mount_full_tmpfs(full)
    try:
        before = snapshot(run)
        out = full / "out"
        result = cli(*command, "--out", str(out), run=run)
        output = result.stdout + result.stderr
        assert "Traceback" not in output, output
        assert result.returncode == 75, output
        assert re.search(rf"--out {re.escape(str(out))}: no space left on device", output), output
        assert len(output.strip().splitlines()) == 1, output  # one line
        assert sorted(p.name for p in full.iterdir()) == ["filler"], "a half-written output was left behind"
        assert snapshot(run) == before
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_serve_on_a_port_in_use_says_so_at_once(reference, tmp_path):
    import socket

    from runs import free_ports

    (port,) = free_ports(1)
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = cli("serve", "--port", str(port), run=reference["dir"], timeout=60)  # it used to hang
    finally:
        taken.close()
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 78, output
    assert re.search(rf"--port {port}: address already in use.*choose another --port", output), output
    assert "serving" not in output, output  # refused before announcing or loading anything


def test_serve_lists_the_served_model_with_its_adapters(reference, tmp_path):
    """`GET /v1/models` against a real `serve`: the model served (with the adapters), not
    a scan of a Hugging Face cache that does not exist offline (it printed a traceback);
    a request naming that id is answered by the model with the adapters."""
    import json
    import subprocess
    import sys
    import urllib.request

    from runs import ENV, free_ports, track, wait_for

    run = reference["dir"]
    (port,) = free_ports(1)
    env = {**ENV, "HF_HOME": str(tmp_path / "no-hf-home"), "HF_HUB_CACHE": str(tmp_path / "no-hf-home" / "hub")}
    server = track(subprocess.Popen([sys.executable, "-m", "mathlora_daemon", "serve", "--run-dir", str(run),
                                     "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True, env=env))

    def get(path: str):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
                return json.loads(response.read())
        except OSError:
            return None

    try:
        models = wait_for(lambda: get("/v1/models"), server, "serve to answer /v1/models", timeout_s=120)
        (entry,) = models["data"]
        assert entry["id"] == str((run / "mlx_model").resolve()), entry
        assert entry["adapters"] == str((run / "adapters").resolve()) and entry["prompt_format"] == "chat", entry
        body = json.dumps({"model": entry["id"], "messages": [{"role": "user", "content": "1+1?"}],
                           "temperature": 0, "max_tokens": 4}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200 and "choices" in json.loads(response.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    errors = server.stderr.read()
    assert "Traceback" not in errors, errors[-3000:]
    assert "/v1/models" in errors  # the request was served (logged), not failed


def test_a_non_ascii_run_dir_with_an_ascii_terminal_runs(template_dir, tmp_path):
    import subprocess
    import sys

    from runs import ENV

    run = shutil.copytree(template_dir, tmp_path / "nuit-é")
    result = subprocess.run([sys.executable, "-m", "mathlora_daemon", "run", "--run-dir", str(run)],
                            capture_output=True, text=True, encoding="ascii", errors="replace",
                            env={**ENV, "PYTHONIOENCODING": "ascii"}, timeout=300, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "UnicodeEncodeError" not in output, output[-3000:]
    assert result.returncode == 0, output[-3000:]
    assert "nuit-\\xe9" in output, output[-3000:]  # shown, escaped
    assert (run / "adapters" / "adapters.safetensors").is_file()


def test_a_reader_that_closes_stdout_early_is_not_a_failure(reference):
    """`checkpoints list | head -0`: the reader is gone before the first write. Exit 0,
    silently (it was "temporary failure: Broken pipe", exit 75)."""
    import subprocess
    import sys

    from runs import ENV

    read_end, write_end = os.pipe()
    os.close(read_end)  # deterministic: every write to the pipe fails with EPIPE
    try:
        result = subprocess.run([sys.executable, "-m", "mathlora_daemon", "checkpoints", "list", "--run-dir",
                                 str(reference["dir"])], stdout=write_end, stderr=subprocess.PIPE, text=True,
                                env=ENV, timeout=120, stdin=subprocess.DEVNULL)
    finally:
        os.close(write_end)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_a_huge_set_value_is_shown_short_and_blamed_on_its_key(template_dir, tmp_path):
    run = shutil.copytree(template_dir, tmp_path / "run")
    before = snapshot(run)
    result = cli("prepare", "--set", "data.name=" + "x" * 120_000, run=run)
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert result.returncode == 78, output[:2000]
    assert len(output) < 1000, f"the value is echoed whole ({len(output)} characters)"
    assert "data.name" in output and "120000 characters" in output and "at most 4096" in output, output
    assert "--run-dir" not in output, output
    assert snapshot(run) == before


def test_prune_labels_the_checkpoints_it_removed_as_pruned(reference, tmp_path):
    run = shutil.copytree(reference["dir"], tmp_path / "run")
    result = cli("checkpoints", "prune", "--keep", "1", run=run)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    removed = [line for line in output.splitlines() if line.startswith("step ")]
    assert removed and all(line.rstrip().endswith("pruned") for line in removed), output
    assert "DAMAGED" not in output, output


def test_a_long_data_name_under_the_limit_is_blamed_on_the_key_not_the_run_dir(template_dir, tmp_path):
    """4000 characters pass the string limit but no file system takes such a name: say
    so about data.name, shortened (it was "--run-dir <the whole path>")."""
    run = shutil.copytree(template_dir, tmp_path / "run")
    result = cli("prepare", "--set", "data.name=" + "x" * 4000, run=run)
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert result.returncode == 78, output[:2000]
    assert "data.name" in output and "4002 characters" in output and len(output) < 600, output[:2000]
    assert "--run-dir" not in output, output[:2000]
