"""The commands: each a thin function from parsed arguments to the package that does the
work, returning the exit code. `config_from` is the one place options become a Config.

Heavy modules (MLX, mlx-lm, torch) are imported inside the commands that need them,
so `status`, `logs` and the control commands answer fast.
"""

from __future__ import annotations

import shlex
import sys
from argparse import Namespace
from pathlib import Path

from mathlora_daemon import testhooks
from mathlora_daemon.config import Config, check_config_file, load_config
from mathlora_daemon.errors import InputError, TemporaryFailure
from mathlora_daemon.rundir import RunDir

# Commands that may be given a run directory that does not exist yet (they create it,
# or, for uninstall, act on the service whatever became of the directory).
MAY_CREATE_RUN_DIR = frozenset({"demo", "convert", "uninstall"})


def check_run_dir(command: str, run: RunDir) -> None:
    """Raise InputError when --run-dir names no directory (a typo, usually) for a command
    that needs one; nothing is created there."""
    if command in MAY_CREATE_RUN_DIR:
        return
    if not run.root.exists():
        raise InputError(f"--run-dir {run.root}: no such directory (check the path; `mathlora-daemon demo` or "
                         "`convert` create a run directory)")
    if not run.root.is_dir():
        raise InputError(f"--run-dir {run.root}: not a directory")


def require_writable(run: RunDir) -> None:
    """Raise the contract error (78; 75 for a full disk) when the run directory or a
    directory in it that the command writes cannot be written."""
    from mathlora_daemon.rundir import unwritable_error

    error = unwritable_error(run)
    if error is not None:
        raise error


def config_path(args: Namespace) -> Path:
    """The config file the options name: --config (which must exist), else <run-dir>/mathlora.toml."""
    if args.config is not None:
        if not check_config_file(args.config, "--config"):  # a directory, FIFO, device: said what it is
            raise InputError(f"--config {args.config}: no such file")
        return args.config
    return args.run_dir.config


def config_from(args: Namespace) -> Config:
    """Given normalized arguments, return the validated Config (file + --set)."""
    return load_config(config_path(args), args.overrides)


def _positive(value: int | None, option: str, minimum: int, what: str = "") -> None:
    if value is not None and value < minimum:
        raise InputError(f"{option} {value}: expected an integer >= {minimum}{what}")


# --- training -----------------------------------------------------------------------------

def run(args: Namespace) -> int:
    from mathlora_daemon.evaluation.evaluate import final_eval
    from mathlora_daemon.evaluation.plot import page_figures
    from mathlora_daemon.runtime.signals import ignore_late_stops
    from mathlora_daemon.training.run import run_command

    ignore_late_stops()  # this process ends with training: a signal after the stop has nothing to stop
    testhooks.hold_point("start", 0)
    # With --debug, args.run_dir is already its debug variant (cli/arguments.py).
    return run_command(args.run_dir, config_path(args), args.overrides, final_eval=final_eval,
                       page_figures=page_figures)


def prepare(args: Namespace) -> int:
    from mathlora_daemon.runtime.logs import close_logging, setup_logging
    from mathlora_daemon.training.memory_plan import check_memory
    from mathlora_daemon.training.model import load_base
    from mathlora_daemon.training.prepare import prepare_tokens

    cfg = config_from(args)
    run = args.run_dir
    require_writable(run)
    log = setup_logging(run, run.root.resolve().name)
    try:
        model_dir = run.model(cfg.model.path)
        _model, tokenizer, _ = load_base(model_dir)
        cache = prepare_tokens(cfg.data, run, model_dir, tokenizer, log)
        # What a training step will need, on stderr: `run` decides, not prepare. After the
        # data, whose errors come first.
        check_memory(cfg, model_dir, log, run.checkpoints, enforce=False)
    finally:
        close_logging()
    m = cache.meta
    first = m.get("skipped_examples") or []  # which rows, so they can be found and fixed
    print(f"rows {m['rows']}, used {m['used_rows']}, skipped {m['skipped_rows']}"
          + (f" (first: {'; '.join(first)})" if first else "") + f", sequences {m['sequences']}, "
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

    if args.html:  # refreshed first, so the page always exists when asked (and says what status says now)
        from mathlora_daemon.evaluation.plot import page_figures
        from mathlora_daemon.runtime.report_page import Page

        print(Page(args.run_dir, page_figures).write())
        return 0
    return status_main(args.run_dir, as_json=args.json, out=sys.stdout, service_probe=service_status)


def logs(args: Namespace) -> int:
    from mathlora_daemon.runtime.logview import logs_main

    _positive(args.lines, "--lines", 0)
    return logs_main(args.run_dir, lines=args.lines, follow=args.follow, level=args.level, event=args.event,
                     as_json=args.json, out=sys.stdout)


def control(args: Namespace) -> int:
    """pause, resume, stop: a request in state/control.json for the running daemon,
    answered "accepted" only once the daemon has acknowledged it."""
    from mathlora_daemon.errors import EXIT_TEMPFAIL
    from mathlora_daemon.runtime.control import send_request
    from mathlora_daemon.runtime.lock import probe_lock

    outcome, request, pid = send_request(args.run_dir, args.command, probe_lock)
    if outcome == "no_daemon":
        gone = f" (daemon pid {pid} exited before reading the request)" if pid else ""
        print(f"no daemon is running in {args.run_dir.root}{gone}; nothing to {args.command}", file=sys.stderr)
        return 1
    if outcome == "unacknowledged":
        print(f"{args.command} requested (id {request['id'][:8]}) but daemon pid {pid} has not acknowledged it "
              "within 10 s (suspended or busy? `mathlora-daemon status` tells); the request stays and is acted "
              "on when the daemon reads it", file=sys.stderr)
        return EXIT_TEMPFAIL
    what = {"stop": "checkpoints at the next step boundary and exits",
            "pause": "checkpoints at the next step boundary and waits (`mathlora-daemon resume` continues)",
            "resume": "continues training"}[args.command]
    print(f"{args.command} accepted (id {request['id'][:8]}) by daemon pid {pid}: it {what}")
    return 0


def checkpoints(args: Namespace) -> int:
    from mathlora_daemon.cli.checkpoints import checkpoints_command
    from mathlora_daemon.runtime.lock import LockHeld, acquire_lock

    cfg = config_from(args)
    _positive(getattr(args, "keep", None), "--keep", 1)
    keep = getattr(args, "keep", None) or cfg.daemon.keep_checkpoints
    root = args.run_dir.checkpoints
    if args.action != "prune":
        return checkpoints_command(args.action, root, keep, as_json=args.json, out=sys.stdout)
    # A daemon may be resuming from the very checkpoint prune would remove: prune only
    # under the run's lock (the store's retention rule assumes it).
    try:
        lock = acquire_lock(args.run_dir, retries=0.2)
    except LockHeld as exc:
        stop = shlex.join(["mathlora-daemon", "stop", "--run-dir", str(args.run_dir.root)])  # quoted: it pastes
        raise TemporaryFailure(f"{exc}; stop it first (`{stop}`): it prunes its own checkpoints as it trains") from None
    except FileNotFoundError:
        raise InputError(f"--run-dir {args.run_dir.root}: no such directory") from None
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
    run = args.run_dir
    adapter_dir = args.adapter_path or run.adapters
    out = args.out or run.export(args.format)
    if args.format == "gguf":
        return _export_gguf(args, cfg, run, adapter_dir, out)
    base = args.base_model or default_base_model(cfg, run)
    info = export_peft(adapter_dir, out, base)
    print(f"exported {info['tensors']} tensors (rank {info['rank']}, lora_alpha {info['lora_alpha']}, "
          f"scale {info['scale']:g}, {', '.join(info['target_modules'])}) for {base} -> {out}")
    return 0


def _recorded_base_gguf(cfg: Config, run: RunDir) -> Path | None:
    """model.name when it is a .gguf file that exists (the run's base came from it)."""
    if not cfg.model.name.endswith(".gguf"):
        return None
    candidate = Path(cfg.model.name).expanduser()
    candidate = candidate if candidate.is_absolute() else run.root / candidate
    return candidate if candidate.is_file() else None


def _export_gguf(args: Namespace, cfg: Config, run: RunDir, adapter_dir: Path, out: Path) -> int:
    from mathlora_daemon.evaluation.evaluate import STOP_MARKERS, recorded_template
    from mathlora_daemon.modelio.gguf_export import export_gguf, modelfile_text, ollama_template
    from mathlora_daemon.modelio.loading import check_adapter_dir, check_model_dir
    from mathlora_daemon.training.template import PromptFormat

    model_dir = run.model(cfg.model.path)
    base_gguf = args.base_gguf or _recorded_base_gguf(cfg, run)
    if base_gguf is not None and not Path(base_gguf).is_file():
        raise InputError(f"--base-gguf {base_gguf}: no such file")
    check_adapter_dir(adapter_dir)
    check_model_dir(model_dir)  # names a missing tokenizer before transformers' misleading message
    from mlx_lm.utils import load_tokenizer

    fmt = PromptFormat.of(recorded_template(adapter_dir, cfg.data.template), load_tokenizer(model_dir))
    template, stops = ollama_template(fmt, STOP_MARKERS)
    if base_gguf is not None:
        base_ref, note = str(Path(base_gguf).resolve()), ""
    else:
        base_ref = "./base.gguf"
        note = ("Put a GGUF of the base model the adapters were trained on at ./base.gguf, or change FROM "
                "(a path, or an Ollama model of the same base).")
    info = export_gguf(adapter_dir, model_dir, out, args.outtype, base_gguf, modelfile_text(base_ref, template, stops,
                                                                                            note))
    print(f"exported {info['tensors']} tensors (rank {info['rank']}, alpha {info['alpha']:g}, {info['outtype']}, "
          f"{', '.join(info['target_modules'])}) -> {info['file']}  ({info['bytes'] / 1e6:.1f} MB)")
    print(f"Ollama Modelfile -> {out / 'Modelfile'} (FROM {base_ref}); then: ollama create my-math -f "
          f"{shlex.quote(str(out / 'Modelfile'))}")  # quoted: it works pasted, spaces and all
    if base_gguf is None:
        print("note: no base GGUF known (--base-gguf); the Modelfile's FROM needs one", file=sys.stderr)
    return 0


def fuse(args: Namespace) -> int:
    from mathlora_daemon.modelio.fuse import fuse_model

    cfg = config_from(args)
    run = args.run_dir
    out = args.out or run.fused
    base_gguf = args.base_gguf or (_recorded_base_gguf(cfg, run) if args.gguf else None)
    if args.gguf and base_gguf is None:
        raise InputError("fuse --gguf: no GGUF of the base model; give --base-gguf FILE (llama.cpp's "
                         "convert_hf_to_gguf.py makes one from the Hugging Face model)")
    info = fuse_model(run.model(cfg.model.path), args.adapter_path or run.adapters, out, dequantize=args.dequantize,
                      base_gguf=base_gguf)
    where = "mlx-lm and transformers" if info["transformers_loadable"] else "mlx-lm (quantized)"
    print(f"fused {info['fused_modules']} LoRA modules into the base ({info['dtype']}) -> {out}; loads with {where}")
    if info["gguf"]:
        g = info["gguf"]
        print(f"GGUF for llama.cpp / Ollama: {g['tensors_fused']} of {g['tensors']} tensors of {base_gguf} merged "
              f"({', '.join(g['fused_types'])}), the rest as they were -> {g['path']} ({g['bytes'] / 1e6:.1f} MB)")
    return 0


def serve(args: Namespace) -> int:
    from mathlora_daemon.evaluation.evaluate import recorded_template
    from mathlora_daemon.evaluation.generate import default_adapter_path
    from mathlora_daemon.evaluation.serve import serve_main

    cfg = config_from(args)
    _positive(args.port, "--port", 1)
    if args.port > 65535:
        raise InputError(f"--port {args.port}: expected 1-65535")
    _positive(args.max_tokens, "--max-tokens", 1)
    adapters = None if args.no_adapters else (args.adapter_path or default_adapter_path(args.run_dir))
    template = recorded_template(adapters, cfg.data.template)
    model_dir = args.run_dir.model(cfg.model.path)
    banner = (f"serving {model_dir}" + (f" with adapters {adapters}" if adapters else " (no adapters)")
              + f", {template} prompt format, on http://{args.host}:{args.port}/v1 (OpenAI API: /v1/chat/completions, "
              "/v1/completions, /v1/models); Ctrl-C stops")
    return serve_main(model_dir, adapters, template, args.host, args.port, args.max_tokens, banner=banner)


# --- evaluation -----------------------------------------------------------------------------

def generate(args: Namespace) -> int:
    from mathlora_daemon.evaluation.generate import default_adapter_path, generate_text

    cfg = config_from(args)
    adapters = None if args.no_adapters else (args.adapter_path or default_adapter_path(args.run_dir))
    which = f"adapters {adapters}" if adapters else "base model, no adapters"
    print(f"[{which}]", file=sys.stderr)
    generate_text(args.run_dir.model(cfg.model.path), args.prompt, adapters, args.max_new_tokens,
                  args.temperature, args.seed, out=sys.stdout, template=cfg.data.template)
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

    out = args.out or args.run_dir.plot
    info = plot_run(args.run_dir, out)
    print(f"plotted {info['points']} steps, {info['evals']} validation point(s), {info['resumes']} resume(s), "
          f"{info['checkpoints']} checkpoint(s) -> {out}")
    return 0


# --- the demo -------------------------------------------------------------------------------

def demo(args: Namespace) -> int:
    from mathlora_daemon.demo.walkthrough import run_demo

    return run_demo(args.run_dir, prepare_only=args.prepare_only)


COMMANDS = {"run": run, "prepare": prepare, "launch": launch, "status": status, "logs": logs, "pause": control,
            "resume": control, "stop": control, "checkpoints": checkpoints, "install": install,
            "uninstall": uninstall, "convert": convert, "export": export, "fuse": fuse, "generate": generate,
            "eval": evaluate, "plot": plot, "demo": demo, "serve": serve}
