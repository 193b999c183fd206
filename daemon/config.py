"""The run's configuration: `mathlora.toml` plus `--set section.key=value` overrides.

Every key is optional; defaults are the original suite's. Validation happens before
anything is loaded or written, and every problem is reported at once with the key, the
offending value and what is allowed (exit code 78 through `InputError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import MODEL_DIR

METHODS = ("sft", "grpo", "sft+grpo")  # train.method; training/stages.py runs the last as two stages


def key(default=None, *, help: str, allowed: str, expected: str | None = None,
        check: Callable[[Any], bool] | None = None, reload: bool = False, fingerprint: bool = False,
        factory: Callable[[], Any] | None = None, secret: bool = False):
    """Declare a config key: its default, what it does (`help`, also docs/reference.md's table), what
    is allowed (`allowed` for the table, `expected` for an error message, `check` the
    test), whether a running daemon may apply a change (`reload`), whether a change
    makes existing checkpoints meaningless (`fingerprint`), and whether its value is a
    secret (`secret`: never echoed in an error message, a log line or status)."""
    meta = {"help": help, "allowed": allowed, "expected": expected or allowed, "check": check, "reload": reload,
            "fingerprint": fingerprint, "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _non_empty(v: str) -> bool:
    return bool(v.strip())


@dataclass
class ModelConfig:
    name: str = key("deepseek-ai/deepseek-math-7b-instruct", fingerprint=True, check=_non_empty,
                    allowed="non-empty", expected="a non-empty HF repo id, local directory or .gguf file",
                    help="the base model this run is for (recorded in the adapters): HF repo id, local HF or MLX "
                         "directory, or a `.gguf` file")
    path: str = key(MODEL_DIR, check=_non_empty, allowed="non-empty", expected="a non-empty directory path",
                    help="the MLX model directory, relative to the run directory")
    quantize_bits: int = key(0, fingerprint=True, check=lambda v: v in (0, 4, 8), allowed="0, 4, 8",
                             expected="one of 0, 4, 8", help="quantized base for QLoRA (0 keeps the dtype)")


@dataclass
class DataConfig:
    name: str = key("open-r1/OpenR1-Math-220k", fingerprint=True, check=_non_empty, allowed="non-empty",
                    expected="a non-empty HF dataset id or local .jsonl/.parquet path",
                    help="HF dataset id, or a local `.jsonl`/`.parquet` file or folder (relative paths: run "
                         "directory first)")
    subset: str = key("all", fingerprint=True, allowed="string", help="HF dataset configuration")
    split: str = key("train", fingerprint=True, allowed="string", help="HF dataset split")
    problem_field: str = key("problem", fingerprint=True, check=_non_empty, allowed="non-empty",
                             expected="a non-empty field name", help="field holding the problem")
    solution_field: str = key("solution", fingerprint=True, check=_non_empty, allowed="non-empty",
                              expected="a non-empty field name", help="field holding the solution")
    max_seq_len: int = key(1024, fingerprint=True, check=lambda v: 16 <= v <= 131072, allowed="16 to 131072",
                           expected="an integer from 16 to 131072",
                           help="model positions per sequence: longer texts are split into chunks of max_seq_len + "
                                "1 tokens (overlapping by one), so a full chunk trains exactly max_seq_len targets")
    limit: int = key(0, fingerprint=True, check=lambda v: v >= 0, allowed=">= 0", expected="an integer >= 0 (0 = all "
                     "rows)", help="use only the first N rows (0 = all)")
    template: str = key("chat", fingerprint=True, check=lambda v: v in ("chat", "tutor"), allowed="chat, tutor",
                        expected='"chat" or "tutor"',
                        help="`chat`: the model's own chat template, the problem followed by DeepSeek-Math's "
                             "instruction to reason step by step and box the answer; `tutor`: the original text "
                             "template (for base models without a chat template)")
    solution_source: str = key("solution", fingerprint=True, check=lambda v: v in ("solution", "generation"),
                               allowed="solution, generation", expected='"solution" or "generation"',
                               help="what to train on: the solution field, or the first of OpenR1's `generations` "
                                    "that `correctness_math_verify` marks correct (rows without one are skipped)")
    long_rows: str = key("chunk", fingerprint=True, check=lambda v: v in ("chunk", "skip"), allowed="chunk, skip",
                         expected='"chunk" or "skip"',
                         help="rows longer than max_seq_len + 1 tokens: split into chunks (a later chunk has lost its "
                              "problem) or skip them; `prepare` counts both")
    validation_fraction: float = key(0.01, fingerprint=True, check=lambda v: 0 <= v < 0.5, allowed="[0, 0.5)",
                                     expected="a number in [0, 0.5)",
                                     help="share of rows held out for validation, chosen by a hash of the problem "
                                          "(deterministic, never trained on); 0 = none")
    answer_field: str = key("answer", fingerprint=True, allowed="string",
                            help="field holding the final answer (GRPO's reference, eval's too); where it is empty "
                                 "the last \\boxed{} of the solution is used")
    pack: bool = key(False, fingerprint=True, allowed="bool",
                     help="SFT: several whole sequences per row of max_seq_len positions, each attending only to "
                          "itself (no padding between them); `train.batch_size` then counts rows; rows are decided "
                          "once and recorded in the token cache")
    validation_name: str = key("", fingerprint=True, allowed='`""` or a path',
                               help="a separate validation file or folder (`.jsonl`/`.parquet`); when set, every row "
                                    "of data.name is trained on and validation_fraction is not used")


@dataclass
class LoraConfig:
    rank: int = key(8, fingerprint=True, check=lambda v: 1 <= v <= 4096, allowed="1 to 4096",
                    expected="an integer from 1 to 4096", help="LoRA rank")
    alpha: float = key(16.0, fingerprint=True, check=lambda v: v > 0, allowed="> 0", expected="a number > 0",
                       help="LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = key(0.0, fingerprint=True, check=lambda v: 0.0 <= v < 1.0, allowed="[0, 1)",
                         expected="a number in [0, 1)", help="dropout on the LoRA input")
    targets: list[str] = key(factory=lambda: ["q_proj", "v_proj"], fingerprint=True,
                             check=lambda v: bool(v) and all(t.strip() for t in v) and len(set(v)) == len(v),
                             allowed="non-empty, distinct",
                             expected='a non-empty list of distinct module names, e.g. ["q_proj", "v_proj"]',
                             help="linear layers to adapt in every layer (`q_proj` or `self_attn.q_proj`)")


@dataclass
class TrainConfig:
    epochs: int = key(1, check=lambda v: 1 <= v <= 10000, allowed="1 to 10000", expected="an integer from 1 to 10000",
                      help="passes over the data")
    batch_size: int = key(1, fingerprint=True, check=lambda v: 1 <= v <= 4096, allowed="1 to 4096",
                          expected="an integer from 1 to 4096", help="sequences per micro-batch")
    grad_accumulation_steps: int = key(8, fingerprint=True, check=lambda v: 1 <= v <= 4096, allowed="1 to 4096",
                                       expected="an integer from 1 to 4096",
                                       help="micro-batches per optimizer step (their gradients are averaged)")
    learning_rate: float = key(1e-5, fingerprint=True, check=lambda v: 0 < v <= 1, allowed="(0, 1]",
                               expected="a number > 0 and <= 1", help="Adam learning rate")
    seed: int = key(0, fingerprint=True, check=lambda v: 0 <= v < 2**32, allowed="0 to 2^32-1",
                    expected="an integer from 0 to 2^32-1", help="LoRA init, data order of every epoch, dropout")
    max_steps: int = key(0, check=lambda v: v >= 0, allowed=">= 0", expected="an integer >= 0 (0 = no cap)",
                         help="stop after this many optimizer steps (0 = all epochs)")
    group_by_length: bool = key(False, fingerprint=True, allowed="bool",
                                help="each step's sequences are of similar length (less padding when `batch_size` > "
                                     "1); still a pure function of seed and epoch")
    # Not in the fingerprint: it changes what is kept in memory, not what is computed
    # (bit-identical on the CPU), so after an out-of-memory exit a run may resume with it.
    mask_prompt: bool = key(True, fingerprint=True, allowed="bool",
                            help="train on the solution only: the prompt's tokens are not prediction targets")
    lr_schedule: str = key("cosine", fingerprint=True, check=lambda v: v in ("constant", "cosine", "linear"),
                           allowed="constant, cosine, linear", expected='"constant", "cosine" or "linear"',
                           help="learning rate over the run, after warmup; its length is the run's total steps, or "
                                "the steps the budget allows when the budget ends the run first (estimated once from "
                                "the measured step time, then kept in the checkpoints)")
    warmup_steps: int = key(0, fingerprint=True, check=lambda v: 0 <= v <= 10**6, allowed=">= 0",
                            expected="an integer >= 0", help="steps of linear warmup from 0 to learning_rate")
    min_lr_ratio: float = key(0.1, fingerprint=True, check=lambda v: 0 <= v <= 1, allowed="[0, 1]",
                              expected="a number in [0, 1]",
                              help="the floor of a decaying schedule, as a share of learning_rate")
    weight_decay: float = key(0.0, fingerprint=True, check=lambda v: 0 <= v <= 1, allowed="[0, 1]",
                              expected="a number in [0, 1]", help="AdamW's decoupled weight decay on the adapters")
    max_grad_norm: float = key(1.0, fingerprint=True, check=lambda v: v >= 0, allowed=">= 0 (0 = off)",
                               expected="a number >= 0 (0 = no clipping)",
                               help="clip the gradient's global norm to this (0 = off); the norm is logged each step")
    eval_sequences: int = key(64, check=lambda v: 0 <= v <= 100000, allowed=">= 0 (0 = off)",
                              expected="an integer from 0 to 100000",
                              help="validation sequences whose loss is measured at every checkpoint (a fixed subset; "
                                   "the time counts against the budget)")
    select: str = key("best", check=lambda v: v in ("best", "last"), allowed="best, last", expected='"best" or "last"',
                      help="what adapters/ holds at the end: the checkpoint with the lowest validation loss (GRPO "
                           "from adapters: those adapters when no checkpoint beat them), or the last one")
    early_stop_evals: int = key(0, check=lambda v: 0 <= v <= 10000, allowed=">= 0 (0 = off)",
                                expected="an integer >= 0 (0 = off)",
                                help="stop after this many validation evaluations without a new best")
    final_eval: int = key(0, check=lambda v: 0 <= v <= 100000, allowed=">= 0 (0 = off)",
                          expected="an integer >= 0 (0 = off)",
                          help="at the end of a run, answer this many validation problems with the base model and "
                               "with the adapters and compare accuracy and format (logged, and shown by `status`)")
    method: str = key("sft", fingerprint=True, check=lambda v: v in METHODS, allowed="sft, grpo, sft+grpo",
                      expected='"sft", "grpo" or "sft+grpo"',
                      help="`sft`: learn the solutions (supervised LoRA); `grpo`: learn from answers, rewarding "
                           "sampled completions whose final answer is right (section [rl]); start it from SFT "
                           "adapters with `rl.init_adapters`; `sft+grpo`: both in one run, SFT for "
                           "`rl.sft_share` of the budget, then GRPO from the SFT stage's selected adapters")
    grad_checkpoint: bool = key(False, allowed="bool",
                                help="recompute each layer's activations (and the logits, a slice at a time) in the "
                                     "backward pass: much less memory for about a third more compute; needs "
                                     "`lora.dropout = 0`")


@dataclass
class DaemonConfig:
    budget_hours: float = key(16.0, reload=True, check=lambda v: 0 < v <= 24 * 365, allowed="> 0",
                              expected="a number of hours > 0", help="training time across all restarts")
    segment_minutes: float = key(10.0, reload=True, check=lambda v: 0 < v <= 24 * 60, allowed="(0, 1440]",
                                 expected="a number of minutes > 0 and <= 1440", help="checkpoint at least this often")
    keep_checkpoints: int = key(3, reload=True, check=lambda v: 1 <= v <= 1000, allowed="1 to 1000",
                                expected="an integer from 1 to 1000", help="newest checkpoints kept")
    checkpoint_every_steps: int = key(0, reload=True, check=lambda v: v >= 0, allowed=">= 0",
                                      expected="an integer >= 0 (0 = by time only)",
                                      help="also checkpoint every N optimizer steps (0 = by time only)")
    window: str = key("", reload=True, check=lambda v: _window_ok(v), allowed='`""` or `HH:MM-HH:MM`',
                      expected='"" (any time) or "HH:MM-HH:MM" with different start and end, e.g. "22:00-07:00"',
                      help="train only inside this daily window")
    prevent_sleep: bool = key(True, reload=True, allowed="bool", help="keep the Mac awake while training")
    pause_on_battery: bool = key(True, reload=True, allowed="bool", help="pause while on battery")
    memory_warning_available_gb: float = key(2.0, reload=True, check=lambda v: 0 <= v <= 4096,
                                             allowed="0 to 4096 (0 = off)", expected="a number of GB from 0 to 4096 "
                                             "(0 = off)", help="below this free memory: clear MLX's cache, "
                                                               "`memory.warning`")
    memory_critical_available_gb: float = key(0.5, reload=True, check=lambda v: 0 <= v <= 4096,
                                              allowed="0 to the warning level",
                                              expected="a number of GB from 0 to 4096 (0 = off)",
                                              help="below this: checkpoint and wait until memory recovers")
    memory_limit_gb: float = key(0.0, reload=True, check=lambda v: 0 <= v <= 65536, allowed=">= 0",
                                 expected="a number of GB >= 0 (0 = MLX's default)",
                                 help="MLX's memory limit (0 = MLX's default, or the plan's: see "
                                      "memory_limit_from_plan)")
    memory_limit_from_plan: bool = key(True, allowed="bool",
                                       help="on a GPU with memory_limit_gb = 0: set MLX's memory limit to the "
                                            "memory plan's estimate + 20% at start, so work queued on a slow GPU "
                                            "does not hold freed buffers (7B 4-bit, H100: peak 12.97 -> 6.98 GB "
                                            "at 0.94x the tokens/s)")
    memory_plan: str = key("enforce", check=lambda v: v in ("enforce", "warn", "off"),
                           allowed="enforce, warn, off", expected='"enforce", "warn" or "off"',
                           help="before loading the model, `run` estimates a training step's peak memory from "
                                "config.json and the settings (`memory.plan`) against what the machine offers; "
                                "`enforce`: a plan that does not fit exits 78 naming the settings that would fit; "
                                "`warn`: says so and starts; `off`: no plan")
    # Read by the crash guard as a start decides whether to train at all: a running daemon
    # has no use for it, so a change takes effect at the next start (as the table says).
    max_crash_restarts: int = key(3, check=lambda v: 1 <= v <= 1000, allowed="1 to 1000",
                                  expected="an integer from 1 to 1000",
                                  help="crashed starts in a row (no step completed) before recording `failed`")


@dataclass
class RLConfig:
    group_size: int = key(8, fingerprint=True, check=lambda v: 2 <= v <= 256, allowed="2 to 256",
                          expected="an integer from 2 to 256",
                          help="G: completions sampled per prompt; each is scored against its group's mean")
    prompts_per_step: int = key(4, fingerprint=True, check=lambda v: 1 <= v <= 4096, allowed="1 to 4096",
                                expected="an integer from 1 to 4096", help="prompts per optimizer step")
    max_new_tokens: int = key(512, fingerprint=True, check=lambda v: 1 <= v <= 32768, allowed="1 to 32768",
                              expected="an integer from 1 to 32768", help="longest completion sampled")
    temperature: float = key(1.0, fingerprint=True, check=lambda v: 0 < v <= 10, allowed="(0, 10]",
                             expected="a number > 0 and <= 10", help="sampling temperature of the rollouts")
    top_p: float = key(1.0, fingerprint=True, check=lambda v: 0 < v <= 1, allowed="(0, 1]",
                       expected="a number > 0 and <= 1", help="nucleus sampling of the rollouts (1 = off)")
    beta: float = key(0.04, fingerprint=True, check=lambda v: 0 <= v <= 10, allowed="[0, 10]",
                      expected="a number from 0 to 10",
                      help="weight of the KL penalty to the base model (the adapters switched off; no second "
                           "model in memory); 0.04 as in the DeepSeekMath paper")
    clip_epsilon: float = key(0.2, fingerprint=True, check=lambda v: 0 < v < 1, allowed="(0, 1)",
                              expected="a number > 0 and < 1", help="PPO-style clipping of the probability ratio")
    updates_per_batch: int = key(1, fingerprint=True, check=lambda v: 1 <= v <= 64, allowed="1 to 64",
                                 expected="an integer from 1 to 64",
                                 help="optimizer steps on each batch of rollouts (1: on-policy, the ratio is 1)")
    loss: str = key("dapo", fingerprint=True, check=lambda v: v in ("grpo", "dr_grpo", "dapo"),
                    allowed="grpo, dr_grpo, dapo", expected='"grpo", "dr_grpo" or "dapo"',
                    help="`grpo`: each completion's mean token loss, averaged (long completions weigh less per "
                         "token); `dr_grpo`: advantages not divided by the group's std, tokens summed over a "
                         "constant; `dapo` (default): every token of the batch weighs the same, so a long wrong "
                         "answer is not penalised less than a short one")
    format_weight: float = key(0.1, fingerprint=True, check=lambda v: 0 <= v <= 10, allowed="[0, 10]",
                               expected="a number from 0 to 10",
                               help="reward for a final answer given boxed or on a \"Final Answer\" line, besides "
                                    "1.0 for a correct one")
    skip_flat_groups: int = key(0, fingerprint=True, check=lambda v: 0 <= v <= 16, allowed="0 to 16",
                                expected="an integer from 0 to 16",
                                help="replace a group whose rewards are all equal (no signal) by a group of another "
                                     "training problem, up to this many rounds a step (DAPO's dynamic sampling; "
                                     "0 = keep them, counted as zero_advantage_share)")
    init_adapters: str = key("", fingerprint=True, allowed='`""` or a path',
                             help="start GRPO from these (SFT) adapters; \"\" = fresh LoRA")
    sft_share: float = key(0.5, check=lambda v: 0 < v < 1, allowed="(0, 1)", expected="a number > 0 and < 1",
                           help="`train.method = \"sft+grpo\"`: the share of `daemon.budget_hours` the SFT stage "
                                "trains before GRPO starts (sooner when its epochs end); read until the switch")
    learning_rate: float = key(0.0, check=lambda v: 0 <= v <= 1, allowed="[0, 1] (0 = train.learning_rate)",
                               expected="a number from 0 to 1 (0 = train.learning_rate)",
                               help="`train.method = \"sft+grpo\"`: the GRPO stage's learning rate (GRPO wants a "
                                    "smaller one than SFT, e.g. 3e-5 after 2e-4)")


NOTIFY_EVENTS = ("finished", "budget_exhausted", "failed", "stopped", "new_best")


@dataclass
class ReportConfig:
    tensorboard: bool = key(False, allowed="bool",
                            help="write TensorBoard event files to `logs/tensorboard/` (train/*, val/*, rl/*, lr, "
                                 "memory; each step once across restarts); needs the `tensorboard` extra")
    wandb_project: str = key("", allowed='`""` or a project name',
                             help="log to this Weights & Biases project (offline unless you have logged in; every "
                                  "restart continues the same W&B run); needs the `wandb` extra")
    mlflow_uri: str = key("", allowed='`""`, `"local"` or a tracking URI',
                          help="log to MLflow: `local` = a store in `logs/mlruns/`, or a tracking URI; every restart "
                               "continues the same MLflow run; needs the `mlflow` extra")


@dataclass
class NotifyConfig:
    urls: list[str] = key(factory=list, secret=True, check=lambda v: all(isinstance(u, str) and "://" in u for u in v),
                          allowed="Apprise URLs",
                          expected='a list of Apprise URLs, e.g. ["ntfy://my-topic", "pover://user@token"]',
                          help="tell these services when a run ends (Apprise: ntfy, Pushover, Slack, Telegram, "
                               "e-mail, webhooks ...); they hold secrets: kept in the config only, never logged; "
                               "needs the `notify` extra")
    command: str = key("", allowed='`""` or a command line',
                       help="run this command at each notified event, the event as JSON on its stdin")
    events: list[str] = key(factory=lambda: ["finished", "budget_exhausted", "failed", "stopped"],
                            check=lambda v: all(e in NOTIFY_EVENTS for e in v), allowed=", ".join(NOTIFY_EVENTS),
                            expected=f"a list of: {', '.join(NOTIFY_EVENTS)}",
                            help="which ends (and `new_best`: a new best validation score) notify")
    macos: bool = key(True, allowed="bool",
                      help="on macOS, when no URL or command is set: one Notification Center banner at the end of a "
                           "run")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)

    @property
    def lora_scale(self) -> float:
        return self.lora.alpha / self.lora.rank


_WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def _window_ok(value: str) -> bool:
    if value == "":
        return True
    m = _WINDOW_RE.match(value)
    return bool(m) and (m.group(1), m.group(2)) != (m.group(3), m.group(4))


def _keys() -> dict[str, dataclasses.Field]:
    """{"section.key": its dataclass field} for every key, in declaration order."""
    return {f"{sec.name}.{f.name}": f for sec in dataclasses.fields(Config)
            for f in dataclasses.fields(sec.default_factory)}  # type: ignore[arg-type]


KEYS = _keys()
ALL_KEYS = list(KEYS)
# Derived from the declarations above: what a running daemon may apply, and what a
# checkpoint must agree on (training/checkpointing.py adds the model, cache and template
# identities it computes).
RELOADABLE = frozenset(k for k, f in KEYS.items() if f.metadata["reload"])
FINGERPRINT_KEYS = tuple(k for k, f in KEYS.items() if f.metadata["fingerprint"])


def is_reloadable(name: str) -> bool:
    """Given a dotted config key, return whether a running daemon applies a change (its
    declaration says `reload=True`, and the runtime acts on it: boundary.py)."""
    return name in RELOADABLE


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list of strings"}


def _schema() -> dict[str, dict[str, type]]:
    """Return {section: {key: python type}} derived from the dataclasses' defaults."""
    out: dict[str, dict[str, type]] = {}
    for sec in dataclasses.fields(Config):
        section_obj = sec.default_factory()  # type: ignore[misc]
        out[sec.name] = {f.name: type(getattr(section_obj, f.name)) for f in dataclasses.fields(section_obj)}
    return out


SCHEMA = _schema()


def _coerce(value: Any, kind: type) -> tuple[bool, Any]:
    """Given a raw TOML value and the field's type, return (ok, converted value)."""
    if kind is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool):  # bool is an int subclass: never accept it as a number
        return False, value
    if kind is int:
        return isinstance(value, int), value
    if kind is float:
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    if kind is str:
        return isinstance(value, str), value
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value), value
    return False, value


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not close and "." in name:
        # A right key in the wrong section ("train.rank") is a common slip.
        leaf = name.rsplit(".", 1)[1]
        close = [c for c in choices if c.endswith("." + leaf)][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


# The longest string a key accepts: a path, a repo id or a window are far shorter, and
# a longer value (a file pasted into --set) would only be echoed back in messages.
MAX_STRING = 4096
# How much of a value a message shows: enough to recognise it, never a pasted file.
SHOWN_CHARS = 80


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """Given a text for a message, return it whole when short, else its first `limit`
    characters followed by its length."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _fmt(value: Any) -> str:
    if isinstance(value, str) and len(value) > SHOWN_CHARS:
        return f'{json.dumps(value[:SHOWN_CHARS])[:-1]}..." ({len(value)} characters)'
    return shorten(json.dumps(value) if isinstance(value, (str, list, bool)) else repr(value))


def _too_long(value: Any) -> int | None:
    """The length of a string (or a list's string) over MAX_STRING, else None."""
    texts = value if isinstance(value, list) else [value]
    longest = max((len(t) for t in texts if isinstance(t, str)), default=0)
    return longest if longest > MAX_STRING else None


def parse_override(text: str) -> tuple[str, Any]:
    """Given `section.key=value`, return ("section.key", value); raise InputError when
    the text has no '=' or no section.

    The value is read as a TOML value (numbers, booleans, lists, quoted strings); text
    that is not valid TOML is taken as a bare string, so `data.name=train.jsonl` works.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise InputError(f"--set {shorten(repr(text))}: expected section.key=value, e.g. --set "
                         "train.learning_rate=2e-4")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def check_config_file(path: Path, option: str = "") -> bool:
    """Given a config file's path (and the option that named it, for messages), return
    whether it exists as a regular file (False: absent); raise InputError for a dangling
    symbolic link (naming where it points), a directory or anything else that is not a
    regular file: a FIFO would block the read, /dev/zero never end it. Only stat() is
    used, which never blocks."""
    import os
    import stat

    named = f"{option} {path}" if option else str(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise InputError(f"{named}: a symbolic link to {os.readlink(path)}, which does not exist; fix or "
                             "remove the link") from None
        return False
    except OSError as exc:  # no permission on a directory above it, a loop of links ...
        raise InputError(f"{named}: cannot read the config file ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{named}: is a directory, not a config file; name a TOML file")
    if not stat.S_ISREG(mode):
        raise InputError(f"{named}: not a regular file (a FIFO, socket or device), so not a config file; name a "
                         "TOML file")
    return True


def _read_toml(path: Path) -> dict:
    try:
        # utf-8-sig: a byte-order mark, which some Windows editors write, is not TOML.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc})") from None
    except OSError as exc:  # a directory, no permission ...: still a config error (exit 78)
        raise InputError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Given an optional TOML file and `section.key=value` overrides, return a validated
    Config; raise InputError listing every unknown key, wrong type and out-of-range value
    (each with the value and what is allowed) when any is found.

    A missing file is not an error (every key is optional); a file that exists but is
    unreadable or malformed is.
    """
    errors: list[str] = []
    values: dict[str, tuple[Any, str]] = {}  # "section.key" -> (raw value, where it came from)

    if path is not None and check_config_file(Path(path)):
        where = str(path)
        data = _read_toml(Path(path))
        for section, body in data.items():
            if section not in SCHEMA:
                errors.append(f"{where}: unknown section [{section}]{_suggest(section, list(SCHEMA))}; "
                              f"allowed: {', '.join(SCHEMA)}")
                continue
            if not isinstance(body, dict):
                errors.append(f"{where}: '{section}' must be a table [{section}], got {_fmt(body)}")
                continue
            for key, value in body.items():
                values[f"{section}.{key}"] = (value, where)

    raw: dict[str, str] = {}  # "section.key" -> the text after '=' of its --set
    for text in overrides:
        key, value = parse_override(text)
        values[key] = (value, f"--set {shorten(text)}")
        raw[key] = text.split("=", 1)[1].strip()

    cfg = Config()
    for dotted, (value, where) in values.items():
        section, _, key = dotted.partition(".")
        kind = SCHEMA.get(section, {}).get(key)
        if kind is None:
            errors.append(f"{where}: unknown key '{dotted}'{_suggest(dotted, ALL_KEYS)}")
            continue
        if kind is str and where.startswith("--set") and not isinstance(value, str):
            value = raw[dotted]  # `--set model.name=2024` means the string
        meta = KEYS[dotted].metadata
        show = (lambda _v: "<hidden>") if meta["secret"] else _fmt  # a secret is never echoed
        if meta["secret"] and where.startswith("--set"):
            where = f"--set {dotted}=<hidden>"
        ok, converted = _coerce(value, kind)
        if not ok:
            errors.append(f"{where}: {dotted} = {show(value)} has the wrong type: expected {_TYPE_NAMES[kind]}")
            continue
        length = _too_long(converted)
        if length is not None:
            errors.append(f"{where}: {dotted} = {show(converted)} is not allowed: a string of {length} characters, "
                          f"expected at most {MAX_STRING}")
            continue
        if meta["check"] and not meta["check"](converted):
            errors.append(f"{where}: {dotted} = {show(converted)} is not allowed: expected {meta['expected']}")
            continue
        setattr(getattr(cfg, section), key, converted)

    d = cfg.daemon
    if not errors and cfg.data.pack and cfg.train.method == "grpo":
        errors.append("data.pack = true is for SFT (train.method = \"sft\", or the SFT stage of \"sft+grpo\"); it "
                      "is \"grpo\", which trains on its own completions, one group per prompt: set data.pack = false")
    if not errors and cfg.train.grad_checkpoint and cfg.lora.dropout > 0:
        # The backward pass would recompute each layer with fresh dropout masks, not the
        # forward's, and the gradients would be wrong.
        errors.append(f"train.grad_checkpoint = true needs lora.dropout = 0 (it is {cfg.lora.dropout!r}): "
                      "checkpointing recomputes every layer in the backward pass, where dropout would draw "
                      "other masks than in the forward pass")
    if not errors and d.memory_critical_available_gb > d.memory_warning_available_gb > 0:
        errors.append(f"daemon.memory_critical_available_gb = {d.memory_critical_available_gb!r} is not allowed: "
                      f"expected at most daemon.memory_warning_available_gb ({d.memory_warning_available_gb!r})")
    if errors:
        raise InputError("invalid configuration:\n  " + "\n  ".join(errors))
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Given a Config, return it as plain nested dicts (JSON/TOML-ready)."""
    return dataclasses.asdict(cfg)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # JSON strings and string lists are valid TOML, provided characters outside the BMP
    # stay literal (JSON's \ud83d\ude00 surrogate escapes are invalid TOML) and DEL,
    # which TOML requires escaped, is escaped.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def to_toml(cfg: Config, comment: str = "") -> str:
    """Given a Config, return a complete `mathlora.toml` text that loads back equal."""
    lines = [f"# {line}" for line in comment.splitlines()] + ([""] if comment else [])
    for section, body in config_to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in body.items()]
        lines.append("")
    return "\n".join(lines)


def reference_table() -> str:
    """The configuration table of docs/reference.md, generated from the declarations (a
    test keeps the file in step with it). "change" says when a new value takes effect: while running
    (hot reload), at the next start, or only in a new run (it is in the fingerprint:
    checkpoints made with another value are refused)."""
    rows = ["| key | default | allowed | change | meaning |", "|---|---|---|---|---|"]
    defaults = config_to_dict(Config())
    for dotted, f in KEYS.items():
        section, name = dotted.split(".")
        value = defaults[section][name]
        if isinstance(value, str):
            shown = value or '""'
        elif isinstance(value, float) and 0 < value < 1e-3:
            shown = f"{value:g}".replace("e-0", "e-")
        else:
            shown = _toml_value(value)
        change = "while running" if f.metadata["reload"] else "new run" if f.metadata["fingerprint"] else "next start"
        rows.append(f"| `{dotted}` | `{shown}` | {f.metadata['allowed']} | {change} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"
