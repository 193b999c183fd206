"""Every command's arguments, and the options they share, declared once.

The shared options (`--run-dir`, `--config`, `--set`) are added by `add_shared` to each
command that takes them and, for `checkpoints`, to its actions too, so they work
wherever a user puts them (`checkpoints --run-dir D list` and `checkpoints list
--run-dir D`). `normalize` then merges them into `args.run_dir`, `args.config` and
`args.overrides`; `config_from` (cli/common.py) is the one place that turns them
into a Config.

`args.run_dir` is a RunDir (rundir.py), built here and nowhere else: every layer below
receives it (`run --debug` gets its debug variant), never a bare path to rebuild one
from.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path

from mathlora_daemon import __version__
from mathlora_daemon.rundir import CONFIG_FILE, RunDir

DEMO_DIR = "mathlora-demo"
DESCRIPTION = ("Resumable LoRA fine-tuning daemon for MLX: trains overnight in checkpointed segments "
               "and writes adapters that mlx-lm and PEFT can use.")
SHARED = ("run_dir", "config", "overrides")
_LEVELS = ("command", "action")  # where a shared option may stand: after the command, after its action


def run_dir(value: str) -> RunDir:
    """argparse's `type` for --run-dir: the RunDir every command receives."""
    return RunDir(Path(value))


def add_shared(p: argparse.ArgumentParser, level: str, config: bool = True, run_dir_default: str = ".") -> None:
    """Add the shared options to a command (level "command") or an action ("action").
    Defaults are applied by `normalize`, so an option given at one level is not reset
    by the other's default."""
    p.set_defaults(**{"_run_dir_default": run_dir_default})
    p.add_argument("--run-dir", dest=f"run_dir__{level}", type=run_dir, default=argparse.SUPPRESS, metavar="DIR",
                   help=f"the run directory (default: {run_dir_default})")
    if config:
        p.add_argument("--config", dest=f"config__{level}", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                       help=f"config file (default: <run-dir>/{CONFIG_FILE})")
        p.add_argument("--set", dest=f"overrides__{level}", action="append", default=argparse.SUPPRESS,
                       metavar="SECTION.KEY=VALUE",
                       help="override one config key; repeatable, e.g. --set train.learning_rate=2e-4")


def add_adapters(p: argparse.ArgumentParser, optional: bool, base_alone: str | None = None) -> None:
    """--adapter-path (and, with `base_alone`, --no-adapters), declared once for every
    command that loads adapters. `optional`: the run's adapters are used only when they
    exist (generate, serve); else they are required (eval, export, fuse)."""
    default = "<run-dir>/adapters when it exists" if optional else "<run-dir>/adapters"
    p.add_argument("--adapter-path", type=Path, default=None, metavar="DIR",
                   help=f"adapters directory (default: {default})")
    if base_alone:
        p.add_argument("--no-adapters", action="store_true", help=base_alone)


def normalize(args: argparse.Namespace) -> argparse.Namespace:
    """Merge the shared options given at any level into args.run_dir (a RunDir; with
    `run --debug`, its debug variant), args.config (None: <run-dir>/mathlora.toml) and
    args.overrides (all --set, outer first)."""
    values = vars(args)
    run = config = None
    overrides: list[str] = []
    for level in _LEVELS:
        run = values.pop(f"run_dir__{level}", None) or run
        config = values.pop(f"config__{level}", None) or config
        overrides += values.pop(f"overrides__{level}", None) or []
    run = run or RunDir(Path(values.pop("_run_dir_default", ".")))
    values.pop("_run_dir_default", None)
    args.run_dir = replace(run, debug=True) if getattr(args, "debug", False) else run
    args.config, args.overrides = config, overrides
    return args


class Parser(argparse.ArgumentParser):
    """argparse, with a way out when a value starts with '-': `--run-dir -dash` reads to
    argparse as an option with no value, so say how to write it (`--run-dir=-dash`, or
    `./-dash` for a path). Subparsers are made of the same class."""

    argv: list[str] = []  # the command line being parsed (set by `parse`)

    def error(self, message: str):
        match = re.match(r"argument (\S+): expected one argument$", message)
        action = self._option_string_actions.get(match.group(1).split("/")[0]) if match else None
        if action is not None:
            for option in action.option_strings:
                value = _dash_value(Parser.argv, option)
                if value is not None:
                    long = max(action.option_strings, key=len)  # `-n=-3` would not parse; `--lines=-3` does
                    path = f", or ./{value} for a path" if action.type in (Path, run_dir) else ""
                    message += f" ({value!r} starts with '-', so it reads as an option: write {long}={value}{path})"
                    break
        super().error(message)


def _dash_value(argv: list[str], option: str) -> str | None:
    """The value after `option` in argv when it starts with '-' (argparse took it for an option)."""
    for i, arg in enumerate(argv[:-1]):
        if arg == option and argv[i + 1].startswith("-") and argv[i + 1] not in ("-", "--"):
            return argv[i + 1]
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mathlora-daemon", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mathlora-daemon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, config: bool = True, run_dir_default: str = ".") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        add_shared(p, "command", config, run_dir_default)
        return p

    p = command("run", "train in the foreground (what launchd starts)")
    p.add_argument("--debug", action="store_true",
                   help="quick check: the first 10 rows, a few steps, adapters to <run-dir>/debug/adapters")

    # status and logs read no config, but take --config/--set like every command (README
    # says so), so a command line edited from another command's still works.
    p = command("status", "what the daemon is doing (or did last), fast, whether it runs or not")
    as_what = p.add_mutually_exclusive_group()
    as_what.add_argument("--json", action="store_true", help="machine-readable output")
    as_what.add_argument("--html", action="store_true",
                         help="write the morning report's page (<run-dir>/report.html, self-contained) from the "
                              "current status and print its path")

    p = command("logs", "show the structured log (last lines, follow, filter)")
    p.add_argument("-n", "--lines", type=int, default=20, help="how many of the last matching lines (default 20)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines, across rotation")
    p.add_argument("--level", choices=["debug", "info", "warning", "error", "critical"], help="minimum level")
    p.add_argument("--event", help="an event name or prefix, e.g. checkpoint or train.step")
    p.add_argument("--json", action="store_true", help="raw JSON lines")

    for name, text in (("pause", "pause training at the next step boundary (after a checkpoint)"),
                       ("resume", "resume a paused daemon"),
                       ("stop", "checkpoint at the next step boundary and exit 0")):
        command(name, text, config=False)

    command("prepare", "tokenize the dataset into the token cache and report counts")

    p = command("generate", "answer a problem with the trained adapters (or the base model)")
    p.add_argument("--prompt", required=True, help="the math problem")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    add_adapters(p, optional=True, base_alone="use the base model alone")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, for temperature > 0 (default 0)")

    p = command("checkpoints", "list, verify or prune the run's checkpoints")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("list", "every checkpoint, newest last (reads manifests only)"),
                       ("verify", "check sizes and SHA-256 of every file; exit 1 when any fails"),
                       ("prune", "keep the newest daemon.keep_checkpoints (or --keep N) plus the best by eval loss; "
                                 "refused while a daemon runs")):
        q = actions.add_parser(name, help=text, description=text)
        add_shared(q, "action")
        q.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "prune":
            q.add_argument("--keep", type=int, default=None, help="how many of the newest to keep")

    p = command("install", "train under launchd (macOS LaunchAgent) or systemd (Linux user service)")
    p.add_argument("--at", metavar="HH:MM", default=None,
                   help="start training daily at this time (default: the start of daemon.window, if set)")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="print the plist (or the systemd units) and write nothing")
    p.add_argument("--system", choices=["launchd", "systemd"], default=None,
                   help="with --print: the files for this service manager instead of this machine's")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hosts", default=None,
                       help="a distributed job (mathlora-daemon launch): hosts, this machine (rank 0) first")
    where.add_argument("--hostfile", type=Path, default=None, help="a distributed job: mlx.launch's hostfile")
    p.add_argument("-n", "--ranks", type=int, default=1, help="with --hosts/--hostfile: ranks per host")

    command("uninstall", "stop the installed service (after its checkpoint) and remove its files", config=False)

    p = command("launch", "run a distributed job through mlx.launch, supervised (for launchd/systemd)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--hosts", help="comma-separated hosts, rank 0 (this machine) first; as for mlx.launch")
    where.add_argument("--hostfile", type=Path, help="mlx.launch's JSON hostfile; this machine first")
    p.add_argument("-n", "--ranks", type=int, default=1, help="ranks per host (mlx.launch --repeat-hosts)")
    p.add_argument("--backend", choices=["ring", "mpi", "nccl", "jaccl", "jaccl-ring"], default=None,
                   help="MLX distributed backend (default: mlx.launch's: nccl with CUDA, else ring)")
    p.add_argument("--starting-port", type=int, default=None, help="first port of the ring backend")

    from mathlora_daemon.modelio.convert import DTYPES

    p = command("convert", "convert the base model (HF repo, local dir with .safetensors or .bin, or .gguf) "
                           "into <run-dir>/<model.path>")
    p.add_argument("--source", default=None,
                   help="HF repo id, local model directory or .gguf file (default: config model.name)")
    p.add_argument("--quantize", type=int, choices=(0, 4, 8), default=None,
                   help="4 or 8 = quantize for QLoRA, 0 = keep the dtype (default: config model.quantize_bits)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype of the unquantized weights (default: the checkpoint's)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing model directory (the old one stays until the new one is complete)")

    from mathlora_daemon.evaluation.evaluate import ANSWER_FIELD, DEFAULT_LIMIT, DEFAULT_MAX_NEW_TOKENS, DEFAULT_SPLIT

    p = command("eval", "accuracy of the base model and the adapters on held-out problems")
    p.add_argument("--data", default=None, metavar="FILE|hub:ID",
                   help="held-out problems: a .jsonl/.parquet file or folder, or hub:<dataset id> "
                        "(default: <run-dir>/data/test.jsonl, the demo's test split)")
    p.add_argument("--split", default=DEFAULT_SPLIT,
                   help=f"split of a hub dataset or layout folder (default: {DEFAULT_SPLIT})")
    p.add_argument("--subset", default=None, help="subset (configuration) of a hub dataset")
    p.add_argument("--answer-field", default=ANSWER_FIELD,
                   help=f"field with the reference answer (default: {ANSWER_FIELD}; without it, the answer "
                        "is taken from the solution)")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                   help=f"problems to evaluate (default: {DEFAULT_LIMIT}; 0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"tokens generated per problem at most (default: {DEFAULT_MAX_NEW_TOKENS})")
    add_adapters(p, optional=False)
    p.add_argument("--no-base", action="store_true", help="evaluate the adapters only")
    p.add_argument("--json", action="store_true", help="print the full record (summaries and every item) as JSON")
    p.add_argument("--out", type=Path, default=None, help="also write the full record as JSON to this file")

    from mathlora_daemon.modelio.export import FORMATS

    p = command("export", "export the adapters for other tools: PEFT, or llama.cpp / Ollama (GGUF)")
    p.add_argument("--format", choices=FORMATS, default="peft",
                   help="peft (Hugging Face PEFT) or gguf (a llama.cpp LoRA adapter and an Ollama Modelfile); "
                        "default: peft")
    add_adapters(p, optional=False)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: <run-dir>/export/<format>)")
    p.add_argument("--base-model", default=None,
                   help="peft: base_model_name_or_path to record (default: model.name, or the local model's path)")
    p.add_argument("--base-gguf", type=Path, default=None,
                   help="gguf: the base model's GGUF file: every tensor is checked against it and the Modelfile's "
                        "FROM names it (default: model.name when it is a .gguf)")
    p.add_argument("--outtype", choices=("f32", "f16"), default="f32",
                   help="gguf: the adapter tensors' type (default: f32, as llama.cpp's converter writes)")

    p = command("fuse", "merge the adapters into the base model (for mlx-lm and transformers; --gguf: llama.cpp)")
    add_adapters(p, optional=False)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: <run-dir>/fused)")
    p.add_argument("--dequantize", action="store_true",
                   help="write a quantized base as full-precision weights (needed for transformers)")
    p.add_argument("--base-gguf", type=Path, default=None,
                   help="also write <out>/model.gguf for llama.cpp / Ollama: this GGUF of the base model with the "
                        "adapters merged in (llama architecture; default: model.name when it is a .gguf, with --gguf)")
    p.add_argument("--gguf", action="store_true", help="write model.gguf too (needs a base GGUF: --base-gguf)")

    p = command("serve", "the base model with the adapters behind an OpenAI-compatible HTTP server (mlx-lm's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    add_adapters(p, optional=True, base_alone="serve the base model alone")
    p.add_argument("--max-new-tokens", "--max-tokens", dest="max_tokens", type=int, default=512, metavar="N",
                   help="a request's max_tokens when it gives none (default: 512; --max-tokens: the old name)")

    p = command("plot", "draw the loss and learning-rate curves of the run as a PNG")  # reads only the log
    p.add_argument("--out", type=Path, default=None, help="the PNG to write (default: <run-dir>/loss.png)")

    p = command("demo", "tiny model + synthetic math data: prepare, train, generate (offline)", config=False,
                run_dir_default=DEMO_DIR)
    p.add_argument("--prepare-only", action="store_true", help="write model, data and config, then stop")
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line into normalized arguments (argparse exits 2 on misuse)."""
    Parser.argv = list(sys.argv[1:] if argv is None else argv)
    return normalize(build_parser().parse_args(argv))
