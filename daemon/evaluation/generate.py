"""`generate`: answer one problem with the base model or the trained adapters.

The prompt is wrapped in the training template, so the model sees what it learned from,
and tokens stream to the terminal as they are produced.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import ADAPTER_WEIGHTS, RunDir
from mathlora_daemon.training.template import format_prompt


def generate_text(model_dir: Path, prompt: str, adapter_path: Path | None = None, max_new_tokens: int = 128,
                  temperature: float = 0.8, seed: int = 0, out: TextIO | None = None) -> str:
    """Given a model directory, a problem and optional adapters, return the generated
    solution, streaming it to `out`; raise InputError for a missing model or adapters.
    temperature 0 is greedy."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import load

    if not (model_dir / "config.json").is_file():
        raise InputError(f"--model-path: {model_dir} is not an MLX model directory (no config.json)")
    if adapter_path is not None and not (adapter_path / ADAPTER_WEIGHTS).is_file():
        raise InputError(f"--adapter-path: {adapter_path} holds no adapters.safetensors")
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {max_new_tokens}: expected an integer >= 1")
    if temperature < 0:
        raise InputError(f"--temperature {temperature}: expected a number >= 0 (0 = greedy)")
    mx.random.seed(seed)
    model, tokenizer = load(str(model_dir), adapter_path=str(adapter_path) if adapter_path else None)
    pieces = []
    for response in stream_generate(model, tokenizer, format_prompt(prompt), max_tokens=max_new_tokens,
                                    sampler=make_sampler(temp=temperature)):
        pieces.append(response.text)
        if out is not None:
            out.write(response.text)
            out.flush()
    if out is not None:
        out.write("\n")
    return "".join(pieces)


def default_adapter_path(run_dir: Path) -> Path | None:
    """The run's own adapters, when training has written them."""
    path = RunDir(run_dir).adapters
    return path if (path / ADAPTER_WEIGHTS).is_file() else None
