"""The commands: each a thin function from parsed arguments to the package that does the
work, returning the exit code. `config_from` is the one place options become a Config.

Heavy modules (MLX, mlx-lm, torch) are imported inside the commands that need them,
so `status`, `logs` and the control commands answer fast.
"""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

from mathlora_daemon.config import Config, load_config
from mathlora_daemon.errors import InputError, TemporaryFailure
from mathlora_daemon.rundir import RunDir


def config_path(args: Namespace) -> Path:
    """The config file the options name: --config (which must exist), else <run-dir>/mathlora.toml."""
    if args.config is not None:
        if not args.config.is_file():
            raise InputError(f"--config {args.config}: no such file")
        return args.config
    return RunDir(args.run_dir).config


def config_from(args: Namespace) -> Config:
    """Given normalized arguments, return the validated Config (file + --set)."""
    return load_config(config_path(args), args.overrides)


def _positive(value: int | None, option: str, minimum: int, what: str = "") -> None:
    if value is not None and value < minimum:
        raise InputError(f"{option} {value}: expected an integer >= {minimum}{what}")


# --- training -----------------------------------------------------------------------------

def run(args: Namespace) -> int:
    from mathlora_daemon.training.run import run_command

    return run_command(args.run_dir, config_path(args), args.overrides, debug=args.debug)


def prepare(args: Namespace) -> int:
    from mathlora_daemon.runtime.logs import close_logging, setup_logging
    from mathlora_daemon.training.model import load_base
    from mathlora_daemon.training.prepare import prepare_tokens

    cfg = config_from(args)
    log = setup_logging(args.run_dir, args.run_dir.resolve().name)
    try:
        model_dir = RunDir(args.run_dir).model(cfg.model.path)
        _model, tokenizer, _ = load_base(model_dir)
        cache = prepare_tokens(cfg.data, args.run_dir, model_dir, tokenizer, log)
    finally:
        close_logging()
    m = cache.meta
    print(f"rows {m['rows']}, used {m['used_rows']}, skipped {m['skipped_rows']}, sequences {m['sequences']}, "
          f"tokens {m['tokens']}, over max_seq_len {m['exceeded_max_seq_len']} "
          f"({100 * m['exceeded_max_seq_len'] / max(m['used_rows'], 1):.1f}%) -> {cache.path}")
    return 0


def launch(args: Namespace) -> int:
    from mathlora_daemon.service.launch import launch_main

    return launch_main(args.run_dir, args.config, args.overrides, args.hosts, args.hostfile, args.ranks,
                       args.backend, args.starting_port)


# --- the running daemon ---------------------------------------------------------------------

def status(args: Namespace) -> int:
    from mathlora_daemon.runtime.status import status_main
    from mathlora_daemon.service.install import service_status

    return status_main(args.run_dir, as_json=args.json, out=sys.stdout, service_probe=service_status)


def logs(args: Namespace) -> int:
    from mathlora_daemon.runtime.logview import logs_main

    _positive(args.lines, "--lines", 0)
    return logs_main(args.run_dir, lines=args.lines, follow=args.follow, level=args.level, event=args.event,
                     as_json=args.json, out=sys.stdout)


def control(args: Namespace) -> int:
    """pause, resume, stop: a request in state/control.json for the running daemon."""
    from mathlora_daemon.runtime.control import write_request
    from mathlora_daemon.runtime.lock import probe_lock

    running, pid = probe_lock(args.run_dir)
    if not running:
        print(f"no daemon is running in {args.run_dir}; nothing to {args.command}", file=sys.stderr)
        return 1
    request = write_request(args.run_dir, args.command)
    print(f"{args.command} requested (id {request['id'][:8]}); daemon pid {pid} acts at the next step boundary")
    return 0


def checkpoints(args: Namespace) -> int:
    from mathlora_daemon.cli.checkpoints import checkpoints_command
    from mathlora_daemon.runtime.lock import LockHeld, acquire_lock

    cfg = config_from(args)
    _positive(getattr(args, "keep", None), "--keep", 1)
    keep = getattr(args, "keep", None) or cfg.daemon.keep_checkpoints
    root = RunDir(args.run_dir).checkpoints
    if args.action != "prune":
        return checkpoints_command(args.action, root, keep, as_json=args.json, out=sys.stdout)
    # A daemon may be resuming from the very checkpoint prune would remove: prune only
    # under the run's lock (the store's retention rule assumes it).
    try:
        lock = acquire_lock(args.run_dir, retries=0.2)
    except LockHeld as exc:
        raise TemporaryFailure(f"{exc}; stop it first (`mathlora-daemon stop`): it prunes its own checkpoints "
                               "as it trains") from None
    except FileNotFoundError:
        raise InputError(f"--run-dir {args.run_dir}: no such directory") from None
    with lock:
        return checkpoints_command("prune", root, keep, as_json=args.json, out=sys.stdout)


# --- the service --------------------------------------------------------------------------

def install(args: Namespace) -> int:
    from mathlora_daemon.service.install import install_main, real_host

    launch_args = []
    if args.hostfile is not None:
        if not args.hostfile.is_file():
            raise InputError(f"--hostfile {args.hostfile}: no such file")
        launch_args = ["--hostfile", str(args.hostfile.resolve())]
    elif args.hosts is not None:
        launch_args = ["--hosts", args.hosts]
    if launch_args and args.ranks != 1:
        _positive(args.ranks, "-n", 1, " (ranks per host)")
        launch_args += ["-n", str(args.ranks)]
    return install_main(args.run_dir, args.at, args.config, args.overrides, args.print_only, args.system,
                        real_host(), sys.stdout, sys.stderr, launch_args)


def uninstall(args: Namespace) -> int:
    from mathlora_daemon.service.install import real_host, uninstall_main

    return uninstall_main(args.run_dir, real_host(), sys.stdout, sys.stderr)


# --- models in, adapters out ----------------------------------------------------------------

def convert(args: Namespace) -> int:
    from mathlora_daemon.modelio.convert import convert_main

    cfg = config_from(args)
    return convert_main(cfg, args.run_dir, args.source, args.quantize, args.dtype, args.force)


def export(args: Namespace) -> int:
    from mathlora_daemon.modelio.export import default_base_model, export_peft

    cfg = config_from(args)
    run = RunDir(args.run_dir)
    adapter_dir = args.adapter_path or run.adapters
    out = args.out or run.export(args.format)
    base = args.base_model or default_base_model(cfg, args.run_dir)
    info = export_peft(adapter_dir, out, base)
    print(f"exported {info['tensors']} tensors (rank {info['rank']}, lora_alpha {info['lora_alpha']}, "
          f"scale {info['scale']:g}, {', '.join(info['target_modules'])}) for {base} -> {out}")
    return 0


def fuse(args: Namespace) -> int:
    from mathlora_daemon.modelio.fuse import fuse_model

    cfg = config_from(args)
    run = RunDir(args.run_dir)
    out = args.out or run.fused
    info = fuse_model(run.model(cfg.model.path), args.adapter_path or run.adapters, out, dequantize=args.dequantize)
    where = "mlx-lm and transformers" if info["transformers_loadable"] else "mlx-lm (quantized)"
    print(f"fused {info['fused_modules']} LoRA modules into the base ({info['dtype']}) -> {out}; loads with {where}")
    return 0


# --- evaluation -----------------------------------------------------------------------------

def generate(args: Namespace) -> int:
    from mathlora_daemon.evaluation.generate import default_adapter_path, generate_text

    cfg = config_from(args)
    adapters = None if args.no_adapters else (args.adapter_path or default_adapter_path(args.run_dir))
    which = f"adapters {adapters}" if adapters else "base model, no adapters"
    print(f"[{which}]", file=sys.stderr)
    generate_text(RunDir(args.run_dir).model(cfg.model.path), args.prompt, adapters, args.max_new_tokens,
                  args.temperature, args.seed, out=sys.stdout)
    return 0


def evaluate(args: Namespace, generate_fn=None) -> int:
    from mathlora_daemon.evaluation.evaluate import eval_main

    cfg = config_from(args)
    _positive(args.limit, "--limit", 0, " (0 = all)")
    _positive(args.max_new_tokens, "--max-new-tokens", 1)
    return eval_main(cfg, args.run_dir, args.data, args.split, args.subset, args.answer_field, args.limit,
                     args.max_new_tokens, args.adapter_path, args.no_base, args.json, args.out, generate_fn)


def plot(args: Namespace) -> int:
    from mathlora_daemon.evaluation.plot import plot_run

    out = args.out or RunDir(args.run_dir).plot
    info = plot_run(args.run_dir, out)
    print(f"plotted {info['points']} steps, {info['resumes']} resume(s), {info['checkpoints']} checkpoint(s) -> {out}")
    return 0


# --- the demo -------------------------------------------------------------------------------

def demo(args: Namespace) -> int:
    from mathlora_daemon.demo.walkthrough import BASE_STEPS, run_demo

    base_steps = BASE_STEPS if args.base_steps is None else args.base_steps
    _positive(base_steps, "--base-steps", 0)
    return run_demo(args.run_dir, prepare_only=args.prepare_only, base_steps=base_steps)


COMMANDS = {"run": run, "prepare": prepare, "launch": launch, "status": status, "logs": logs, "pause": control,
            "resume": control, "stop": control, "checkpoints": checkpoints, "install": install,
            "uninstall": uninstall, "convert": convert, "export": export, "fuse": fuse, "generate": generate,
            "eval": evaluate, "plot": plot, "demo": demo}
