"""`mathlora-daemon` command line: parse arguments, dispatch to one action, map errors
to the documented exit codes (78 for configuration and input errors)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from daemon import __version__
from daemon.config import CONFIG_FILE, load_config
from daemon.errors import EXIT_CONFIG, InputError, TemporaryFailure

DEMO_DIR = "mathlora-demo"
DESCRIPTION = ("Resumable LoRA fine-tuning daemon for MLX: trains overnight in checkpointed segments "
               "and writes adapters that mlx-lm and PEFT can use.")


def _add_run_args(p: argparse.ArgumentParser, default_run_dir: str = ".") -> None:
    p.add_argument("--run-dir", default=default_run_dir, type=Path,
                   help=f"the run directory (default: {default_run_dir})")
    p.add_argument("--config", type=Path, default=None, help=f"config file (default: <run-dir>/{CONFIG_FILE})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key; repeatable, e.g. --set train.learning_rate=2e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mathlora-daemon", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mathlora-daemon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="train in the foreground (what launchd starts)")
    _add_run_args(p)
    p.add_argument("--debug", action="store_true",
                   help="quick check: the first 10 rows, a few steps, adapters to <run-dir>/debug/adapters")

    p = sub.add_parser("status", help="what the daemon is doing (or did last), fast, whether it runs or not")
    p.add_argument("--run-dir", default=".", type=Path, help="the run directory (default: .)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("logs", help="show the structured log (last lines, follow, filter)")
    p.add_argument("--run-dir", default=".", type=Path, help="the run directory (default: .)")
    p.add_argument("-n", "--lines", type=int, default=20, help="how many of the last matching lines (default 20)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines, across rotation")
    p.add_argument("--level", choices=["debug", "info", "warning", "error", "critical"], help="minimum level")
    p.add_argument("--event", help="an event name or prefix, e.g. checkpoint or train.step")
    p.add_argument("--json", action="store_true", help="raw JSON lines")

    for name, text in (("pause", "pause training at the next step boundary (after a checkpoint)"),
                       ("resume", "resume a paused daemon"),
                       ("stop", "checkpoint at the next step boundary and exit 0")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--run-dir", default=".", type=Path, help="the run directory (default: .)")

    p = sub.add_parser("prepare", help="tokenize the dataset into the token cache and report counts")
    _add_run_args(p)

    p = sub.add_parser("generate", help="answer a problem with the trained adapters (or the base model)")
    _add_run_args(p)
    p.add_argument("--prompt", required=True, help="the math problem")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--adapter-path", type=Path, default=None,
                   help="adapters directory (default: <run-dir>/adapters when it exists)")
    p.add_argument("--no-adapters", action="store_true", help="use the base model alone")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("checkpoints", help="list, verify or prune the run's checkpoints")
    cp = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("list", "every checkpoint, newest last (reads manifests only)"),
                       ("verify", "check sizes and SHA-256 of every file; exit 1 when any fails"),
                       ("prune", "keep the newest daemon.keep_checkpoints (or --keep N) plus the best by eval loss")):
        q = cp.add_parser(name, help=text)
        _add_run_args(q)
        q.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "prune":
            q.add_argument("--keep", type=int, default=None, help="how many of the newest to keep")

    p = sub.add_parser("install", help="train under launchd (macOS LaunchAgent) or systemd (Linux user service)")
    _add_run_args(p)
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

    p = sub.add_parser("uninstall", help="stop the installed service (after its checkpoint) and remove its files")
    p.add_argument("--run-dir", default=".", type=Path, help="the run directory (default: .)")

    from daemon.convert import add_convert_parser
    from daemon.evaluate import add_eval_parser
    from daemon.export import add_export_parser
    from daemon.fuse import add_fuse_parser
    from daemon.launch import add_launch_parser
    from daemon.plot import add_plot_parser

    for add in (add_convert_parser, add_eval_parser, add_export_parser, add_fuse_parser, add_plot_parser):
        add(sub)
    add_launch_parser(sub, _add_run_args)

    p = sub.add_parser("demo", help="tiny model + synthetic math data: prepare, train, generate (offline)")
    p.add_argument("--run-dir", default=DEMO_DIR, type=Path, help=f"where to build the demo (default: ./{DEMO_DIR})")
    p.add_argument("--prepare-only", action="store_true", help="write model, data and config, then stop")
    p.add_argument("--base-steps", type=int, default=None, metavar="N",
                   help="steps to pretrain the tiny base model (default 150, about a minute; 0 = random base)")
    return parser


def _config(args):
    path = args.config if args.config is not None else args.run_dir / CONFIG_FILE
    if args.config is not None and not path.is_file():
        raise InputError(f"--config {path}: no such file")
    return load_config(path, args.overrides)


def _cmd_run(args) -> int:
    from daemon.run import run_command

    path = args.config if args.config is not None else args.run_dir / CONFIG_FILE
    if args.config is not None and not path.is_file():
        raise InputError(f"--config {path}: no such file")
    return run_command(args.run_dir, path, args.overrides, debug=args.debug)


def _cmd_status(args) -> int:
    from daemon.status import status_main

    return status_main(args.run_dir, as_json=args.json, out=sys.stdout)


def _cmd_logs(args) -> int:
    from daemon.logview import logs_main

    if args.lines < 0:
        raise InputError(f"--lines {args.lines}: expected an integer >= 0")
    return logs_main(args.run_dir, lines=args.lines, follow=args.follow, level=args.level, event=args.event,
                     as_json=args.json, out=sys.stdout)


def _cmd_control(args) -> int:
    from daemon.control import write_request
    from daemon.lock import probe_lock

    running, pid = probe_lock(args.run_dir)
    if not running:
        print(f"no daemon is running in {args.run_dir}; nothing to {args.command}", file=sys.stderr)
        return 1
    request = write_request(args.run_dir, args.command)
    print(f"{args.command} requested (id {request['id'][:8]}); daemon pid {pid} acts at the next step boundary")
    return 0


def _cmd_prepare(args) -> int:
    from daemon.model import load_base
    from daemon.logs import close_logging, setup_logging
    from daemon.prepare import prepare_tokens
    from daemon.run import model_dir

    cfg = _config(args)
    log = setup_logging(args.run_dir, args.run_dir.resolve().name)
    try:
        mdir = model_dir(cfg, args.run_dir)
        _model, tokenizer, _ = load_base(mdir)
        cache = prepare_tokens(cfg.data, args.run_dir, mdir, tokenizer, log)
    finally:
        close_logging()
    m = cache.meta
    print(f"rows {m['rows']}, used {m['used_rows']}, skipped {m['skipped_rows']}, sequences {m['sequences']}, "
          f"tokens {m['tokens']}, over max_seq_len {m['exceeded_max_seq_len']} "
          f"({100 * m['exceeded_max_seq_len'] / max(m['used_rows'], 1):.1f}%) -> {cache.path}")
    return 0


def _cmd_generate(args) -> int:
    from daemon.generate import default_adapter_path, main_generate
    from daemon.run import model_dir

    cfg = _config(args)
    adapters = None if args.no_adapters else (args.adapter_path or default_adapter_path(args.run_dir))
    return main_generate(model_dir(cfg, args.run_dir), args.prompt, adapters, args.max_new_tokens,
                         args.temperature, args.seed)


def _cmd_checkpoints(args) -> int:
    from daemon.checkpoints_cli import checkpoints_command

    cfg = _config(args)
    keep = getattr(args, "keep", None)
    if keep is not None and keep < 1:
        raise InputError(f"--keep {keep}: expected an integer >= 1")
    return checkpoints_command(args.action, args.run_dir / "checkpoints", keep or cfg.daemon.keep_checkpoints,
                               as_json=args.json, out=sys.stdout)


def _cmd_install(args) -> int:
    from daemon.install import install_main, real_host

    launch = []
    if args.hostfile is not None:
        if not args.hostfile.is_file():
            raise InputError(f"--hostfile {args.hostfile}: no such file")
        launch = ["--hostfile", str(args.hostfile.resolve())]
    elif args.hosts is not None:
        launch = ["--hosts", args.hosts]
    if launch and args.ranks != 1:
        if args.ranks < 1:
            raise InputError(f"-n {args.ranks}: expected an integer >= 1 (ranks per host)")
        launch += ["-n", str(args.ranks)]
    return install_main(args.run_dir, args.at, args.config, args.overrides, args.print_only, args.system,
                        real_host(), sys.stdout, sys.stderr, launch)


def _cmd_uninstall(args) -> int:
    from daemon.install import real_host, uninstall_main

    return uninstall_main(args.run_dir, real_host(), sys.stdout, sys.stderr)


def _lazy(module: str, function: str):
    """A command whose module is imported only when it runs."""
    def command(args) -> int:
        import importlib

        return getattr(importlib.import_module(module), function)(args)
    return command


def _cmd_demo(args) -> int:
    from daemon.demo import run_demo

    from daemon.demo import BASE_STEPS

    base_steps = BASE_STEPS if args.base_steps is None else args.base_steps
    if base_steps < 0:
        raise InputError(f"--base-steps {base_steps}: expected an integer >= 0")
    return run_demo(args.run_dir, prepare_only=args.prepare_only, base_steps=base_steps)


COMMANDS = {"run": _cmd_run, "status": _cmd_status, "logs": _cmd_logs, "pause": _cmd_control,
            "resume": _cmd_control, "stop": _cmd_control, "prepare": _cmd_prepare, "generate": _cmd_generate,
            "checkpoints": _cmd_checkpoints, "install": _cmd_install, "uninstall": _cmd_uninstall,
            "convert": _lazy("daemon.convert", "main_convert"), "eval": _lazy("daemon.evaluate", "main_eval"),
            "export": _lazy("daemon.export", "main_export"), "fuse": _lazy("daemon.fuse", "main_fuse"),
            "plot": _lazy("daemon.plot", "main_plot"), "launch": _lazy("daemon.launch", "main_launch"),
            "demo": _cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.umask(0o077)  # everything the daemon creates is user-only (0600 files, 0700 dirs)
    try:
        return COMMANDS[args.command](args)
    except InputError as exc:
        print(f"mathlora-daemon {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TemporaryFailure as exc:
        print(f"mathlora-daemon {args.command}: temporary failure (exit 75, safe to retry): {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
