"""Trying the adapters: the front-ends of `generate` (one answer), `eval` (accuracy of the
base model and the adapters, as a table or JSON), `plot` (the loss curves as a PNG) and
`serve` (mlx-lm's OpenAI-compatible server). evaluation/ does the work and returns
what it found; what is printed, and when, is decided here.

Heavy modules (MLX, mlx-lm) are imported inside the commands that need them.
"""

from __future__ import annotations

import json
import sys
from argparse import Namespace

from mathlora_daemon.cli.common import config_from, positive
from mathlora_daemon.errors import InputError


def _adapters(args: Namespace):
    """The adapters `generate` and `serve` use: --adapter-path, else the run's own; None
    with --no-adapters (or none trained yet)."""
    from mathlora_daemon.evaluation.generate import default_adapter_path

    return None if args.no_adapters else (args.adapter_path or default_adapter_path(args.run_dir))


def generate(args: Namespace) -> int:
    from mathlora_daemon.evaluation.generate import generate_text

    cfg = config_from(args)
    adapters = _adapters(args)
    which = f"adapters {adapters}" if adapters else "base model, no adapters"
    print(f"[{which}]", file=sys.stderr)
    generate_text(args.run_dir.model(cfg.model.path), args.prompt, adapters, args.max_new_tokens,
                  args.temperature, args.seed, out=sys.stdout, template=cfg.data.template)
    return 0


def evaluate(args: Namespace, generate_fn=None) -> int:
    """Evaluate the base model and the adapters (default: the run's own, when trained),
    print the table (or, with --json, the record), also write the record to --out, and
    return 0; InputError for a missing model, adapters or problems. `generate_fn`: see
    evaluation/evaluate.py's GenerateFn (tests)."""
    from mathlora_checkpoints.fsio import atomic_write_text
    from mathlora_daemon.evaluation.evaluate import (
        HUB_PREFIX,
        eval_adapters,
        eval_record,
        format_table,
        limit_note,
        load_problems,
    )

    cfg = config_from(args)
    positive(args.limit, "--limit", 0, " (0 = all)")
    positive(args.max_new_tokens, "--max-new-tokens", 1)
    run, data, limit = args.run_dir, args.data, args.limit
    adapters = eval_adapters(run, args.adapter_path, args.no_base)  # a bad --adapter-path fails at once
    if adapters is None:
        print(f"no adapters in {run.adapters}: evaluating the base model only", file=sys.stderr)
    described, problems = load_problems(data, run, cfg.data, args.split, args.subset, args.answer_field, limit)
    note = limit_note(problems, limit, hub=bool(data and data.startswith(HUB_PREFIX)))
    if note and args.json:
        print(f"eval: {note}", file=sys.stderr)
    record = eval_record(cfg, run, described, problems, adapters, args.no_base, limit, args.max_new_tokens,
                         generate_fn)
    text = json.dumps(record, indent=2, ensure_ascii=False)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text + "\n")
    print(text if args.json else f"{described}{': ' + note if note else ''}\n{format_table(record)}")
    return 0


def plot(args: Namespace) -> int:
    from mathlora_daemon.evaluation.plot import plot_run

    out = args.out or args.run_dir.plot
    info = plot_run(args.run_dir, out)
    print(f"plotted {info['points']} steps, {info['evals']} validation point(s), {info['resumes']} resume(s), "
          f"{info['checkpoints']} checkpoint(s) -> {out}")
    return 0


def serve(args: Namespace) -> int:
    """Check the model, the adapters and the address, say what is served (stderr), then
    serve until Ctrl-C; return 0."""
    from mathlora_daemon.evaluation.evaluate import recorded_template
    from mathlora_daemon.evaluation.serve import check_serving, serve_model

    cfg = config_from(args)
    positive(args.port, "--port", 1)
    if args.port > 65535:
        raise InputError(f"--port {args.port}: expected 1-65535")
    positive(args.max_tokens, "--max-tokens", 1)
    adapters = _adapters(args)
    template = recorded_template(adapters, cfg.data.template)
    model_dir = args.run_dir.model(cfg.model.path)
    check_serving(model_dir, adapters, args.host, args.port)  # before the model loads (evaluation/serve.py)
    print(f"serving {model_dir}" + (f" with adapters {adapters}" if adapters else " (no adapters)")
          + f", {template} prompt format, on http://{args.host}:{args.port}/v1 (OpenAI API: /v1/chat/completions, "
          "/v1/completions, /v1/models); Ctrl-C stops", file=sys.stderr, flush=True)
    serve_model(model_dir, adapters, template, args.host, args.port, args.max_tokens)
    return 0
