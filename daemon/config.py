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

from daemon.errors import InputError

CONFIG_FILE = "mathlora.toml"


@dataclass
class ModelConfig:
    name: str = "deepseek-ai/deepseek-math-7b-instruct"
    path: str = "mlx_model"
    quantize_bits: int = 0


@dataclass
class DataConfig:
    name: str = "open-r1/OpenR1-Math-220k"
    subset: str = "all"
    split: str = "train"
    problem_field: str = "problem"
    solution_field: str = "solution"
    max_seq_len: int = 1024
    limit: int = 0


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 1
    grad_accumulation_steps: int = 8
    learning_rate: float = 1e-5
    seed: int = 0
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    group_by_length: bool = False  # steps of similar-length sequences: less padding at batch_size > 1
    grad_checkpoint: bool = False  # recompute activations in the backward pass: less memory, ~30% more compute


@dataclass
class DaemonConfig:
    budget_hours: float = 16.0
    segment_minutes: float = 10.0
    keep_checkpoints: int = 3
    checkpoint_every_steps: int = 0  # also checkpoint every N optimizer steps (0 = by time only)
    window: str = ""
    prevent_sleep: bool = True
    pause_on_battery: bool = True
    memory_warning_available_gb: float = 2.0  # below this much free system memory: clear MLX's cache, warn
    memory_critical_available_gb: float = 0.5  # below this: checkpoint and pause until memory recovers
    memory_limit_gb: float = 0.0  # MLX memory limit (0 = MLX's default)
    max_crash_restarts: int = 3  # crashed starts in a row without a step before giving up (exit 0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)

    @property
    def lora_scale(self) -> float:
        return self.lora.alpha / self.lora.rank


_WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def _window_ok(value: str) -> bool:
    if value == "":
        return True
    m = _WINDOW_RE.match(value)
    return bool(m) and (m.group(1), m.group(2)) != (m.group(3), m.group(4))


def _targets_ok(value: list[str]) -> bool:
    return bool(value) and all(t.strip() for t in value) and len(set(value)) == len(value)


# Range checks: key -> (predicate on the already type-checked value, what is allowed).
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.name": (lambda v: bool(v.strip()), "a non-empty HF repo id, local directory or .gguf file"),
    "model.path": (lambda v: bool(v.strip()), "a non-empty directory path"),
    "model.quantize_bits": (lambda v: v in (0, 4, 8), "one of 0, 4, 8"),
    "data.name": (lambda v: bool(v.strip()), "a non-empty HF dataset id or local .jsonl/.parquet path"),
    "data.problem_field": (lambda v: bool(v.strip()), "a non-empty field name"),
    "data.solution_field": (lambda v: bool(v.strip()), "a non-empty field name"),
    "data.max_seq_len": (lambda v: 16 <= v <= 131072, "an integer from 16 to 131072"),
    "data.limit": (lambda v: v >= 0, "an integer >= 0 (0 = all rows)"),
    "lora.rank": (lambda v: 1 <= v <= 4096, "an integer from 1 to 4096"),
    "lora.alpha": (lambda v: v > 0, "a number > 0"),
    "lora.dropout": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "lora.targets": (_targets_ok, "a non-empty list of distinct module names, e.g. [\"q_proj\", \"v_proj\"]"),
    "train.epochs": (lambda v: 1 <= v <= 10000, "an integer from 1 to 10000"),
    "train.batch_size": (lambda v: 1 <= v <= 4096, "an integer from 1 to 4096"),
    "train.grad_accumulation_steps": (lambda v: 1 <= v <= 4096, "an integer from 1 to 4096"),
    "train.learning_rate": (lambda v: 0 < v <= 1, "a number > 0 and <= 1"),
    "train.seed": (lambda v: 0 <= v < 2**32, "an integer from 0 to 2^32-1"),
    "train.max_steps": (lambda v: v >= 0, "an integer >= 0 (0 = no cap)"),
    "daemon.budget_hours": (lambda v: 0 < v <= 24 * 365, "a number of hours > 0"),
    "daemon.segment_minutes": (lambda v: 0 < v <= 24 * 60, "a number of minutes > 0 and <= 1440"),
    "daemon.keep_checkpoints": (lambda v: 1 <= v <= 1000, "an integer from 1 to 1000"),
    "daemon.checkpoint_every_steps": (lambda v: v >= 0, "an integer >= 0 (0 = by time only)"),
    "daemon.memory_warning_available_gb": (lambda v: 0 <= v <= 4096, "a number of GB from 0 to 4096 (0 = off)"),
    "daemon.memory_critical_available_gb": (lambda v: 0 <= v <= 4096, "a number of GB from 0 to 4096 (0 = off)"),
    "daemon.memory_limit_gb": (lambda v: 0 <= v <= 65536, "a number of GB >= 0 (0 = MLX's default)"),
    "daemon.max_crash_restarts": (lambda v: 1 <= v <= 1000, "an integer from 1 to 1000"),
    "daemon.window": (_window_ok, "\"\" (any time) or \"HH:MM-HH:MM\" with different start and end, e.g. \"22:00-07:00\""),
}

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list of strings"}


def _schema() -> dict[str, dict[str, type]]:
    """Return {section: {key: python type}} derived from the dataclasses' defaults."""
    out: dict[str, dict[str, type]] = {}
    for sec in dataclasses.fields(Config):
        section_obj = sec.default_factory()  # type: ignore[misc]
        out[sec.name] = {f.name: type(getattr(section_obj, f.name)) for f in dataclasses.fields(section_obj)}
    return out


SCHEMA = _schema()
ALL_KEYS = [f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys]


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


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, list, bool)) else repr(value)


def parse_override(text: str) -> tuple[str, Any]:
    """Given `section.key=value`, return ("section.key", value); raise InputError when
    the text has no '=' or no section.

    The value is read as a TOML value (numbers, booleans, lists, quoted strings); text
    that is not valid TOML is taken as a bare string, so `data.name=train.jsonl` works.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise InputError(f"--set {text!r}: expected section.key=value, e.g. --set train.learning_rate=2e-4")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _read_toml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
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

    if path is not None and Path(path).exists():
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

    for text in overrides:
        key, value = parse_override(text)
        values[key] = (value, f"--set {text}")

    cfg = Config()
    for dotted, (value, where) in values.items():
        section, _, key = dotted.partition(".")
        kind = SCHEMA.get(section, {}).get(key)
        if kind is None:
            errors.append(f"{where}: unknown key '{dotted}'{_suggest(dotted, ALL_KEYS)}")
            continue
        if kind is str and where.startswith("--set") and not isinstance(value, str):
            value = where.split("=", 1)[1].strip()  # `--set model.name=2024` means the string
        ok, converted = _coerce(value, kind)
        if not ok:
            errors.append(f"{where}: {dotted} = {_fmt(value)} has the wrong type: expected {_TYPE_NAMES[kind]}")
            continue
        check = _CHECKS.get(dotted)
        if check and not check[0](converted):
            errors.append(f"{where}: {dotted} = {_fmt(converted)} is not allowed: expected {check[1]}")
            continue
        setattr(getattr(cfg, section), key, converted)

    d = cfg.daemon
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
