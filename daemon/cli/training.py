"""The training commands' front-ends: `run` (the daemon, in the foreground), `prepare`
(the token cache, and its counts) and `launch` (a distributed job, supervised).

Heavy modules (MLX, mlx-lm) are imported inside the commands that need them.
"""

from __future__ import annotations

import sys
from argparse import Namespace

from mathlora_daemon import testhooks
from mathlora_daemon.cli.common import config_from, config_path, require_writable
from mathlora_daemon.errors import InputError


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
    from mathlora_daemon.training.stages import stage_config, staged

    cfg = config_from(args)
    run = args.run_dir
    require_writable(run)
    log = setup_logging(run, run.root.resolve().name)
    try:
        model_dir = run.model(cfg.model.path)
        _model, tokenizer, _ = load_base(model_dir)
        # The caches `run` will use: GRPO's keeps the training problems; a two-stage night
        # has both (its SFT stage's first).
        stages = [stage_config(cfg, run, stage) for stage in ("sft", "grpo")] if staged(cfg) else [cfg]
        for stage_cfg in stages:
            cache = prepare_tokens(stage_cfg.data, run, model_dir, tokenizer, log,
                                   train_problems=stage_cfg.train.method == "grpo")
        # What a training step will need, on stderr: `run` decides, not prepare. After the
        # data, whose errors come first.
        for stage_cfg in stages:
            check_memory(stage_cfg, model_dir, log, run.checkpoints, enforce=False, cache_root=run.cache)
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
    """Run the distributed job under mlx.launch, supervised (service/launch.py), and
    return rank 0's exit status: 1 when rank 0 recorded none."""
    from mathlora_daemon.service.launch import first_host, is_this_machine, job_argv, launch_job

    run = args.run_dir
    if not run.root.is_dir():
        raise InputError(f"--run-dir {run.root}: no such directory")
    argv = job_argv(run, args.config, args.overrides, args.hosts, args.hostfile, args.ranks, args.backend,
                    args.starting_port)
    name, addresses = first_host(args.hosts, args.hostfile)
    if name and not is_this_machine(name, addresses):
        print(f"mathlora-daemon launch: warning: the first host ({name}) does not look like this machine; rank 0 "
              "must run here, in this run directory, for signals and the exit status to reach it", file=sys.stderr)
    code, launcher_code = launch_job(argv, run)
    if code is not None:
        return code
    print(f"mathlora-daemon launch: rank 0 ended without an exit status of its own (crashed, killed or never "
          f"started; mlx.launch exited {launcher_code}); see the output above", file=sys.stderr)
    return 1
