"""The trackers people already watch: TensorBoard, Weights & Biases, MLflow (`[report]`).

They listen to the run's one voice, its structured log: `Trackers` is a logging handler
beside the JSON file's, so every figure a tracker shows is a figure the log holds, under
the same step:

    train.step  -> train/loss, train/lr, train/grad_norm, train/tok_per_s, train/step_s,
                   train/padding, memory/active_gb, memory/peak_gb, memory/rss_gb,
                   memory/available_gb
    train.eval  -> val/loss (val/accuracy with GRPO)
    rl.step     -> rl/reward_mean, rl/kl, ... (every number of the event)
    train.done, daemon.stop -> the run's summary: the morning report's figures, the
                   adapters' path, how it ended

Across restarts each keeps one run: TensorBoard purges the steps after the checkpoint a
start resumed from (a SIGKILL leaves them logged; they are taken again), so each step
appears once as TensorBoard reads it; W&B and MLflow keep their run ids in
`state/trackers.json` and continue the same run (offline W&B unless the user has logged
in). A tracker that fails (missing package, network, bad key) never stops training: one
`tracker.failed` warning, then that tracker is off for this start.

No MLX here; each library is imported only when its tracker is on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import secrets
import threading
import time

from mathlora_checkpoints.fsio import atomic_write_text, ensure_private_dir
from mathlora_checkpoints.store import read_json_object
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.logs import LOGGER_NAME

STEP_METRICS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tok_per_s": "train/tok_per_s",
                "step_s": "train/step_s", "padding": "train/padding", "mem_active_gb": "memory/active_gb",
                "mem_peak_gb": "memory/peak_gb", "rss_gb": "memory/rss_gb", "sys_available_gb": "memory/available_gb"}
SUMMARY_FIELDS = ("steps", "first_loss", "last_loss", "recent_loss", "selected_step", "best_val_loss",
                  "base_val_loss", "adapters", "train_seconds", "tokens_seen")


def metrics_of(event: dict) -> tuple[int, dict[str, float]] | None:
    """Given a log event, return (step, {metric: value}) for the trackers, or None."""
    name, step = event.get("event"), event.get("step")
    if not isinstance(step, int):
        return None

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if name == "train.step":
        return step, {tag: float(event[k]) for k, tag in STEP_METRICS.items() if number(event.get(k))}
    if name == "train.eval":
        out = {"val/loss": float(event["val_loss"])} if number(event.get("val_loss")) else {}
        if number(event.get("val_accuracy")):
            out["val/accuracy"] = float(event["val_accuracy"])
        return step, out
    if name == "rl.step":
        return step, {f"rl/{k}": float(v) for k, v in event.items() if k not in ("step", "run") and number(v)}
    return None


class _TensorBoard:
    """tensorboardX's event files, written on the trackers' thread itself: its
    SummaryWriter queues events for a thread of its own and its `flush()` does not wait
    for that queue, so a checkpoint could not know its steps were on disk."""

    name = "tensorboard"

    def __init__(self, run: RunDir, start_step: int, config: dict):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.summary import scalar, text

        self._event, self._scalar, self._text_summary = Event, scalar, text
        folder = run.logs / "tensorboard"
        ensure_private_dir(folder)
        # A file is named by the second it was opened; the start's number, after it, keeps
        # two starts of one second apart and in order (TensorBoard reads them sorted by name).
        starts = len(list(folder.glob("events.out.tfevents.*")))
        self.writer = EventsWriter(str(folder / "events"), f".{starts:06d}")
        # Events of steps after the checkpoint this start resumed from are dropped as
        # TensorBoard reads the files (a session START purges from its step on): the steps
        # are taken, and logged, again.
        self.writer.write_event(Event(wall_time=time.time(), step=start_step + 1,
                                      session_log=SessionLog(status=SessionLog.START)))
        if start_step == 0:
            self._text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        self.writer.flush()

    def _write(self, step: int, summary) -> None:
        self.writer.write_event(self._event(wall_time=time.time(), step=step, summary=summary))

    def _text(self, tag: str, text: str, step: int) -> None:
        self._write(step, self._text_summary(tag, text))

    def log(self, step: int, metrics: dict) -> None:
        for tag, value in metrics.items():
            self._write(step, self._scalar(tag, value))

    def flush(self) -> None:
        self.writer.flush()

    def summary(self, fields: dict) -> None:
        self._text("report", "\n".join(f"- {k}: {v}" for k, v in fields.items()), fields.get("steps", 0))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    name = "wandb"

    def __init__(self, run: RunDir, project: str, ids: dict, config: dict):
        from mathlora_daemon.runtime import imports

        wandb = imports.load("wandb")  # the CLI keeps it out of the daemon until here
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
        ensure_private_dir(run.logs)
        # Our own id (8 lowercase hex, as W&B's are): kept before the first start ends.
        self.run = wandb.init(project=project, id=ids.get("wandb") or secrets.token_hex(4), resume="allow",
                              dir=str(run.logs), config=config, mode=mode, name=run.root.name,
                              settings=wandb.Settings(silent=True, console="off"))
        ids["wandb"] = self.run.id

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def summary(self, fields: dict) -> None:
        for k, v in fields.items():
            self.run.summary[k] = v

    def close(self) -> None:
        self.run.finish()


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class _MLflow:
    name = "mlflow"

    def __init__(self, run: RunDir, uri: str, ids: dict, config: dict, start_step: int):
        import mlflow

        # A tracking server that does not answer must not hold the trackers' thread for
        # minutes (MLflow's default: 7 retries with backoff); the user's settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        if uri == "local":
            # MLflow keeps its file store for local use behind this switch (it suggests a
            # database, which mlflow-skinny cannot open); `mlflow ui` needs it set too.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run.logs / "mlruns").resolve().as_uri()
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        if ids.get("mlflow"):
            self.run_id = ids["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name("mathlora-daemon")
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("mathlora-daemon")
            self.run_id = self.client.create_run(experiment_id, run_name=run.root.name).info.run_id
            ids["mlflow"] = self.run_id
            flat = {f"{section}.{k}": str(v)[:500] for section, body in config.items() for k, v in body.items()}
            for i in range(0, len(flat), 100):
                self.client.log_batch(self.run_id, params=[mlflow.entities.Param(k, v)
                                                           for k, v in list(flat.items())[i:i + 100]])
        self.mlflow = mlflow
        self.start_step = start_step

    def log(self, step: int, metrics: dict) -> None:
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.mlflow.entities.Metric(k.replace("/", "_"), v, now, step)
                                                    for k, v in metrics.items()])

    def summary(self, fields: dict) -> None:
        for k, v in fields.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.client.log_metric(self.run_id, f"final_{k}", float(v))
            else:
                self.client.set_tag(self.run_id, k, str(v)[:500])

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")


class Trackers(logging.Handler):
    """A logging handler that mirrors the run's events into the trackers the config
    turns on. The trackers run on a thread of their own, so a slow or unreachable
    service (an MLflow server, W&B online) never holds a step: `emit` only queues.
    Attach with `attach()`; `close()` sends what is queued (for at most CLOSE_WAIT_S)
    and ends the tracker runs.

    The one wait: a `checkpoint.saved` event holds the step until the trackers have
    written everything before it (at most FLUSH_WAIT_S). After a SIGKILL the steps up to
    that checkpoint are never taken again, so figures still queued would be lost for
    good; a fast run killed right after its first checkpoint lost them while W&B was
    still being imported."""

    CLOSE_WAIT_S = 30.0
    FLUSH_WAIT_S = 15.0

    def __init__(self, run: RunDir, report_cfg, config: dict, start_step: int, log, step_offset: int = 0):
        super().__init__(level=logging.INFO)
        self.run, self.log_ = run, log
        # The GRPO stage of "sft+grpo" counts its steps from 0; the trackers draw it after
        # the SFT stage's steps (training/stages.py), on one axis.
        self.step_offset = step_offset
        start_step += step_offset
        self.trackers: list = []
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="mathlora-trackers", daemon=True)
        self.queue.put(("start", (report_cfg, config, start_step)))
        self.thread.start()

    def _start(self, report_cfg, config: dict, start_step: int) -> None:
        run, log = self.run, self.log_
        ids = read_json_object(run.tracker_state) or {}
        wanted = []
        if report_cfg.tensorboard:
            wanted.append(("tensorboard", lambda: _TensorBoard(run, start_step, config)))
        if report_cfg.wandb_project:
            wanted.append(("wandb", lambda: _Wandb(run, report_cfg.wandb_project, ids, config)))
        if report_cfg.mlflow_uri:
            wanted.append(("mlflow", lambda: _MLflow(run, report_cfg.mlflow_uri, ids, config, start_step)))
        for name, make in wanted:
            try:
                self.trackers.append(make())
                log.info("tracker.start", tracker=name, start_step=start_step)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training
                hint = f" (install it: pip install 'mathlora-daemon[{name}]')" \
                    if isinstance(exc, ModuleNotFoundError) else ""
                log.warning("tracker.failed", tracker=name, error=f"{type(exc).__name__}: {exc}"[:300] + hint,
                            note="off for this start; training goes on")
        if ids:
            try:
                ensure_private_dir(run.tracker_state.parent)
                atomic_write_text(run.tracker_state, json.dumps(ids))
            except OSError as exc:
                log.warning("tracker.failed", tracker="state", error=str(exc), note="run ids not kept")

    def handle(self, record: logging.LogRecord) -> bool:
        # Not logging's default, which holds the handler's lock around emit: the trackers'
        # thread logs too (tracker.failed) and would wait for that lock while this thread
        # waits for the flush. `emit` only touches the thread-safe queue.
        if not self.filter(record):
            return False
        flushed = self._queue_event(record)
        if flushed is not None and self.thread.is_alive():
            flushed.wait(self.FLUSH_WAIT_S)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self._queue_event(record)

    def _queue_event(self, record: logging.LogRecord) -> threading.Event | None:
        """Queue what the record means for the trackers; for a checkpoint, return the
        event the trackers' thread sets once everything before it is written."""
        event = record.msg if isinstance(record.msg, dict) else None
        if event is None:
            return None
        found = metrics_of(event)
        if found and self.step_offset:
            found = (found[0] + self.step_offset, found[1])
        summary = None
        if event.get("event") in ("train.done", "daemon.stop"):
            summary = {k: event[k] for k in SUMMARY_FIELDS if k in event}
            if event.get("event") == "daemon.stop":
                summary = {"ended": event.get("reason"), **summary}
        if (found and found[1]) or summary:
            self.queue.put(("event", (found, summary)))
        elif event.get("event") == "checkpoint.saved":
            # What a checkpoint keeps, the trackers keep: after a SIGKILL the steps up to it
            # are not taken again, so their figures must be on disk.
            flushed = threading.Event()
            self.queue.put(("flush", flushed))
            return flushed
        return None

    def _work(self) -> None:
        while True:
            kind, body = self.queue.get()
            try:
                if kind == "start":
                    self._start(*body)
                elif kind == "event":
                    self._dispatch(*body)
                elif kind == "flush":
                    try:
                        for tracker in self.trackers:
                            getattr(tracker, "flush", lambda: None)()
                    finally:
                        body.set()
                else:
                    self._end()
                    return
            finally:
                self.queue.task_done()

    def _dispatch(self, found, summary) -> None:
        for tracker in list(self.trackers):
            try:
                if found and found[1]:
                    tracker.log(*found)
                if summary:
                    tracker.summary(summary)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training
                self.trackers.remove(tracker)
                self.log_.warning("tracker.failed", tracker=tracker.name, error=f"{type(exc).__name__}: {exc}"[:300],
                                  note="off for this start; training goes on")

    def _end(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception:  # noqa: BLE001 - closing a tracker must not turn an exit into a crash
                pass

    def flush(self) -> None:
        """Wait until everything queued so far has reached the trackers."""
        self.queue.join()

    def attach(self) -> None:
        logging.getLogger(LOGGER_NAME).addHandler(self)

    def close(self) -> None:
        logging.getLogger(LOGGER_NAME).removeHandler(self)
        if self.thread.is_alive():
            self.queue.put(("end", None))
            self.thread.join(timeout=self.CLOSE_WAIT_S)
        super().close()


def tracker_config(cfg) -> dict:
    """The config as the trackers record it: every section but the notifications (their
    URLs hold secrets)."""
    from mathlora_daemon.config import config_to_dict

    return {section: body for section, body in config_to_dict(cfg).items() if section != "notify"}

