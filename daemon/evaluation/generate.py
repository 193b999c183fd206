"""`generate`: answer one problem with the base model or the trained adapters.

The problem is put in the prompt format the adapters were trained in (recorded in their
adapter_config.json; the run's data.template for the base model), so the model sees what
it learned from, and tokens stream to the terminal as they are produced. A tutor-format
answer stops where the model starts a new "### Problem:" of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from mathlora_daemon.errors import InputError
from mathlora_daemon.evaluation.evaluate import STOP_MARKERS, recorded_template
from mathlora_daemon.rundir import ADAPTER_WEIGHTS, RunDir
from mathlora_daemon.training.template import PromptFormat


def generate_text(model_dir: Path, prompt: str, adapter_path: Path | None = None, max_new_tokens: int = 128,
                  temperature: float = 0.8, seed: int = 0, out: TextIO | None = None,
                  template: str = "chat") -> str:
    """Given a model directory, a problem and optional adapters, return the generated
    solution, streaming it to `out`; raise InputError for a missing model or adapters.
    temperature 0 is greedy. `template` is the format for the base model; adapters use
    the one they record."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mathlora_daemon.modelio.loading import load_model

    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {max_new_tokens}: expected an integer >= 1")
    if temperature < 0:
        raise InputError(f"--temperature {temperature}: expected a number >= 0 (0 = greedy)")
    mx.random.seed(seed)
    model, tokenizer, config = load_model(model_dir, adapter_path, return_config=True)
    fmt = PromptFormat.of(recorded_template(adapter_path, template), tokenizer)
    prompt_ids = fmt.prompt_ids(prompt)
    limit, source = context_length(config, tokenizer)
    if limit is not None and len(prompt_ids) > limit:
        # Past its context the model runs for minutes on positions it never learned and
        # answers garbage: refuse instead.
        raise InputError(f"--prompt: {len(prompt_ids)} tokens ({len(prompt)} characters) in the prompt format, longer "
                         f"than the model's context of {limit} tokens ({source}); shorten the prompt")
    text, shown = "", 0
    for response in stream_generate(model, tokenizer, prompt_ids, max_tokens=max_new_tokens,
                                    sampler=make_sampler(temp=temperature)):
        text += response.text
        cut = min((i for i in (text.find(m) for m in STOP_MARKERS) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        # Hold back a tail that may be the start of a marker, so nothing shown is taken back.
        safe = len(text) if cut >= 0 else max(shown, len(text) - max(map(len, STOP_MARKERS)))
        if out is not None and safe > shown:
            out.write(text[shown:safe])
            out.flush()
        shown = max(shown, safe)
        if cut >= 0:
            break
    if out is not None:
        out.write(text[shown:] + "\n")
        out.flush()
    return text


# transformers' model_max_length when a tokenizer sets none is int(1e30): not a context.
_SANE_CONTEXT = 10**8


def context_length(config: dict, tokenizer) -> tuple[int | None, str]:
    """Given the model's config.json and its tokenizer, return (the longest input in
    tokens the model was built for, where that figure comes from), or (None, "") when
    neither says: config.json's max_position_embeddings, else the tokenizer's
    model_max_length when it is a real figure."""
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _SANE_CONTEXT:
        return value, "config.json max_position_embeddings"
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _SANE_CONTEXT:
        return value, "the tokenizer's model_max_length"
    return None, ""


def default_adapter_path(run: RunDir) -> Path | None:
    """The run's own adapters, when training has written them."""
    path = run.adapters
    return path if (path / ADAPTER_WEIGHTS).is_file() else None
