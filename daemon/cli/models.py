"""Models in, adapters out: the front-ends of `convert` (the base model into the run),
`export` (PEFT, or a llama.cpp adapter GGUF and an Ollama Modelfile) and `fuse` (the
adapters merged into the base). modelio/ does the work and returns what it made; what
is printed is decided here.

Heavy modules (MLX, mlx-lm, torch) are imported inside the commands that need them.
"""

from __future__ import annotations

import shlex
import sys
from argparse import Namespace
from pathlib import Path

from mathlora_daemon.cli.common import config_from
from mathlora_daemon.config import Config
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir


def convert(args: Namespace) -> int:
    """Convert the base model into the run's model directory (modelio/convert.py) and say
    what was made; InputError (78) and TemporaryFailure (75) propagate."""
    from mathlora_daemon.modelio.convert import convert_for_run

    cfg = config_from(args)
    summary = convert_for_run(cfg, args.run_dir, args.source, args.quantize, args.dtype, args.force)
    out, bits = args.run_dir.model(cfg.model.path), summary["quantize_bits"]
    quant = f", {bits}-bit quantized" if bits else ""
    print(f"converted {summary['source']} ({summary['kind']}, {summary.get('format', '?')}{quant}) -> {out}: "
          f"{summary['tensors']} tensors, {summary['bytes'] / 2**20:.1f} MiB in {summary['seconds']:.1f} s")
    return 0


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
