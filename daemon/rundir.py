"""The run directory: every path in it, in one place (docs/DESIGN.md, "Run directory").

Users, scripts and launchd rely on these names; nothing else in the package spells
them. Light on purpose (pathlib only): `status` builds one without loading MLX.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "mathlora.toml"
MODEL_DIR = "mlx_model"  # model.path's default: the MLX base model, in the run directory
LOCK_FILE = "daemon.lock"
LOG_FILE = Path("logs") / "daemon.jsonl"
# An adapters directory, in mlx-lm's own format (what `mlx_lm.generate --adapter-path` reads).
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class RunDir:
    """A run directory. `debug` is the `run --debug` variant: everything it writes
    (checkpoints, adapters, its status, log, lock, crash records and report) lives under
    `debug/`, so a quick check never touches the real run; it reads the real run's
    config, model, data and token cache."""

    root: Path
    debug: bool = False

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # -- what the user provides --------------------------------------------------------
    @property
    def config(self) -> Path:
        """mathlora.toml: the run's config (the daemon hot-reloads its safe fields)."""
        return self.root / CONFIG_FILE

    def model(self, model_path: str) -> Path:
        """The MLX base model: `model.path`, relative to the run directory unless absolute."""
        path = Path(model_path).expanduser()
        return path if path.is_absolute() else self.root / path

    @property
    def data(self) -> Path:
        """data/: the demo's train.jsonl and test.jsonl (eval's default problems)."""
        return self.root / "data"

    @property
    def demo_train(self) -> Path:
        """data/train.jsonl: the demo's training rows."""
        return self.data / "train.jsonl"

    @property
    def demo_test(self) -> Path:
        """data/test.jsonl: the demo's held-out problems (eval's default problems)."""
        return self.data / "test.jsonl"

    # -- what training writes --------------------------------------------------------------
    @property
    def cache(self) -> Path:
        """cache/<key>/: token caches, one per dataset/tokenizer/template/length."""
        return self.root / "cache"

    @property
    def kernel_cache(self) -> Path:
        """cache/mlx-kernels/: kernels MLX compiled on CUDA, kept across restarts."""
        return self.cache / "mlx-kernels"

    @property
    def debug_root(self) -> Path:
        return self.root / "debug"

    @property
    def scratch(self) -> Path:
        """Where this run's own files go: the run directory, or debug/ for --debug."""
        return self.debug_root if self.debug else self.root

    @property
    def checkpoints(self) -> Path:
        """checkpoints/step-<8 digits>/ (debug/checkpoints/ for --debug)."""
        return self.scratch / "checkpoints"

    @property
    def adapters(self) -> Path:
        """adapters/: the final adapters in mlx-lm's format (debug/adapters/ for --debug)."""
        return self.scratch / "adapters"

    @property
    def sft_stage(self) -> Path:
        """stages/sft/: train.method = "sft+grpo" keeps its finished SFT stage here, once
        GRPO began."""
        return self.scratch / "stages" / "sft"

    @property
    def sft_stage_adapters(self) -> Path:
        """stages/sft/adapters/: the SFT stage's selected adapters (GRPO's start and reference)."""
        return self.sft_stage / "adapters"

    @property
    def sft_stage_checkpoints(self) -> Path:
        """stages/sft/checkpoints/: the SFT stage's checkpoints, moved there at the switch."""
        return self.sft_stage / "checkpoints"

    @property
    def report_file(self) -> Path:
        """report.json: the morning report, written at every end of the run, kept by later starts."""
        return self.scratch / "report.json"

    @property
    def report_html(self) -> Path:
        """report.html: the morning report as a page (tables and the loss plot), one file,
        rewritten at every checkpoint and every end, and by `status --html`."""
        return self.scratch / "report.html"

    # -- the runtime's files ---------------------------------------------------------------
    @property
    def log_file(self) -> Path:
        """logs/daemon.jsonl: the structured log, rotated."""
        return self.scratch / LOG_FILE

    @property
    def logs(self) -> Path:
        """logs/: the structured log, and the trackers' files (tensorboard/, mlruns/, wandb/)."""
        return self.log_file.parent

    @property
    def state(self) -> Path:
        return self.scratch / "state"

    @property
    def tracker_state(self) -> Path:
        """state/trackers.json: the W&B and MLflow run ids every restart continues."""
        return self.state / "trackers.json"

    @property
    def status_file(self) -> Path:
        """state/status.json: the live heartbeat, replaced atomically."""
        return self.state / "status.json"

    @property
    def stage_file(self) -> Path:
        """state/stage.json: train.method = "sft+grpo": which stage the run is in, and
        what the SFT stage left (absent: the SFT stage)."""
        return self.state / "stage.json"

    @property
    def control_file(self) -> Path:
        """state/control.json: the last pause/resume/stop request from the CLI."""
        return self.state / "control.json"

    @property
    def control_ack_file(self) -> Path:
        """state/control-ack.json: the daemon's acknowledgement of the last request it took."""
        return self.state / "control-ack.json"

    @property
    def starts_file(self) -> Path:
        """state/starts.json: the crash guard's record of starts."""
        return self.state / "starts.json"

    @property
    def failure_file(self) -> Path:
        """state/failure.json: a recorded failure that stops launchd's restarts."""
        return self.state / "failure.json"

    @property
    def lock_file(self) -> Path:
        """daemon.lock: the single-instance lock (flock)."""
        return self.scratch / LOCK_FILE

    # -- what the other commands write -----------------------------------------------------
    def export(self, fmt: str) -> Path:
        """export/<format>/: adapters for other tools (peft, gguf)."""
        return self.root / "export" / fmt

    @property
    def fused(self) -> Path:
        """fused/: the base model with the adapters merged in."""
        return self.root / "fused"

    @property
    def plot(self) -> Path:
        """loss.png: the loss curve across every restart."""
        return self.root / "loss.png"


def entry_names() -> set[str]:
    """The names a run directory's top level may hold: what the user provides and what
    every command writes (the demo refuses a directory holding anything else)."""
    run = RunDir(Path())
    paths = (run.config, run.model(MODEL_DIR), run.data, run.cache, run.checkpoints, run.adapters, run.logs,
             run.state, run.debug_root, run.export(""), run.fused, run.plot, run.report_file, run.report_html,
             run.lock_file, run.sft_stage)
    return {path.parts[0] for path in paths if path.parts}


def write_problem(run: RunDir) -> OSError | None:
    """Given a run directory, return the OSError a training start would meet writing it
    (the directory itself for the lock, then each directory it writes), or None.

    Checked up front so an unwritable run directory is one clear error before anything
    starts, not a failure halfway through. Each directory is probed by creating and
    removing a file (permission bits alone lie for root and on read-only mounts)."""
    import errno
    import os
    import tempfile

    for directory in (run.root, run.state, run.log_file.parent, run.cache, run.checkpoints, run.adapters):
        if not directory.exists():
            continue  # created on demand below a directory already probed
        if not directory.is_dir():
            return NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        except OSError as exc:
            if exc.filename is None or exc.filename != str(directory):
                exc = type(exc)(exc.errno, exc.strerror, str(directory))
            return exc
        os.close(fd)
        os.unlink(probe)
    lock = run.root / LOCK_FILE
    if lock.is_dir():
        return IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(lock))
    return None


def unwritable_error(run: RunDir):
    """Given a run directory, return the contract error for writing it (see
    `write_problem`): a TemporaryFailure (75) for a full disk and the like, an
    InputError (78) for permissions, a read-only mount or a wrong file type, each
    saying `--run-dir X cannot be written: <path>: <reason> (<what to do>)`; or None."""
    from mathlora_daemon.errors import classify_os_error

    problem = write_problem(run)
    if problem is None:
        return None
    error = classify_os_error(problem)
    return type(error)(f"--run-dir {run.root} cannot be written: {error}")
