"""Being told: a message when the night ends (`[notify]`), so nobody has to ask.

At every end a start writes (finished, budget_exhausted, stopped, failed: the crash guard
gave up, a configuration error at a guarded start, a run directory that cannot be
written) and, when asked, at a new best validation score, the daemon sends one message
with the morning report's key lines: how it ended, the adapters and their step,
validation loss against the base model's, accuracy before and after, where to look.

Where it goes:
- `notify.urls`: Apprise URLs (ntfy, Pushover, Slack, Telegram, e-mail, webhooks ...);
  they hold secrets: never logged (the log names the service, `ntfy`, not the URL), never
  shown by `status`, never written to a plist or unit (`install` keeps them in the
  config);
- `notify.command`: a command line run with the event as JSON on its stdin;
- on macOS with neither, one Notification Center banner (`notify.macos`).

A notifier that fails (network, bad key, a command that exits non-zero) is one
`notify.failed` warning; it never stops training or changes an exit code. The command
runner and the platform are passed in, so tests drive the real code on Linux.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from mathlora_daemon.rundir import RunDir

COMMAND_TIMEOUT_S = 30
TITLES = {"finished": "finished", "budget_exhausted": "used its training budget", "stopped": "stopped",
          "failed": "FAILED", "new_best": "new best"}


def message(event: str, run: RunDir, reason: str | None, report: dict | None, step: int | None = None,
            html: Path | None = None) -> dict:
    """The notification: {event, run_dir, title, body (the report's key lines), report}."""
    report = report or {}
    name = run.root.name
    lines = []
    if reason and event != "finished":
        lines.append(f"why: {reason}")
    if report.get("adapters"):
        lines.append(f"adapters: {report['adapters']} (step {report.get('selected_step', step)})")
    base, best = report.get("base_val_loss"), report.get("best_val_loss")
    if best is not None:
        lines.append(f"val loss: {best:.4f}" + (f" (base {base:.4f})" if base is not None else ""))
    if report.get("best_val_accuracy") is not None:
        before = report.get("base_val_accuracy")
        lines.append(f"val accuracy: {100 * report['best_val_accuracy']:.1f}%"
                     + (f" (base {100 * before:.1f}%)" if before is not None else ""))
    final = report.get("final_eval") or {}
    base_run, tuned = (final.get("base") or {}), (final.get("adapters") or {})
    if tuned.get("accuracy") is not None:
        lines.append(f"final eval: {100 * tuned['accuracy']:.1f}% correct"
                     + (f" (base {100 * base_run['accuracy']:.1f}%)" if base_run.get("accuracy") is not None else ""))
    lines.append(f"details: mathlora-daemon status --run-dir {run.root}" + (f", {html}" if html else ""))
    title = f"mathlora-daemon: {name} {TITLES.get(event, event)}" + (f" at step {step}" if step is not None else "")
    return {"event": event, "run_dir": str(run.root), "title": title, "body": "\n".join(lines), "step": step,
            "reason": reason, "report": report}


class Notifier(logging.Handler):
    """Sends messages as `[notify]` says. As a logging handler it also hears each
    `train.eval` that sets a new best (`new_best`, when that event is asked for)."""

    def __init__(self, cfg, run: RunDir, log=None, runner=subprocess.run, platform: str = sys.platform):
        super().__init__(level=logging.INFO)
        self.cfg, self.run, self.log_, self.runner, self.platform = cfg, run, log, runner, platform
        self._busy = False

    @property
    def routes(self) -> list[str]:
        routes = [f"apprise:{_scheme(u)}" for u in self.cfg.urls]
        if self.cfg.command:
            routes.append("command")
        if not routes and self.cfg.macos and self.platform == "darwin":
            routes.append("macos")
        return routes

    def send(self, event: str, reason: str | None = None, report: dict | None = None,
             step: int | None = None) -> list[str]:
        """Send `event` by every route the config asks for; return the routes that worked."""
        if event not in self.cfg.events or not self.routes:
            return []
        note = message(event, self.run, reason, report, step,
                       self.run.report_html if self.run.report_html.is_file() else None)
        sent = []
        for route in self.routes:
            try:
                if route.startswith("apprise:"):
                    self._apprise(note, route)
                elif route == "command":
                    self._command(note)
                else:
                    self._macos(note)
                sent.append(route)
            except Exception as exc:  # noqa: BLE001 - being told must never end the night
                self._warn("notify.failed", what=event, route=route, error=_safe_error(exc, self.cfg.urls))
        if sent:
            self._info("notify.sent", what=event, routes=sent)
        return sent

    def send_end(self, started_unix: float) -> list[str]:
        """Send the end this start wrote (report.json newer than `started_unix`), if any."""
        from mathlora_daemon.runtime.report import read_report

        try:
            written = read_report(self.run)
            if not written or float(written.get("ended_unix") or 0) < started_unix:
                return []
            return self.send(written["state"], written.get("reason"), written.get("report"), written.get("step"))
        except Exception as exc:  # noqa: BLE001 - on the way out: the exit's own code stands
            self._warn("notify.failed", what="end", route="all", error=_safe_error(exc, self.cfg.urls))
            return []

    # -- routes --------------------------------------------------------------------------
    def _apprise(self, note: dict, route: str) -> None:
        try:
            import apprise
        except ModuleNotFoundError as exc:
            raise RuntimeError("notify.urls needs Apprise: pip install 'mathlora-daemon[notify]'") from exc

        service = apprise.Apprise()
        for url in self.cfg.urls:
            if f"apprise:{_scheme(url)}" == route and not service.add(url):
                raise ValueError(f"Apprise does not take this {_scheme(url)}:// URL")
        if not service.notify(title=note["title"], body=note["body"]):
            raise RuntimeError(f"the {route[8:]} service did not take the message")

    def _command(self, note: dict) -> None:
        result = self.runner(self.cfg.command, shell=True, input=json.dumps(note, default=str), text=True,
                             capture_output=True, timeout=COMMAND_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"notify.command exited {result.returncode}: {(result.stderr or '').strip()[-200:]}")

    def _macos(self, note: dict) -> None:
        def quoted(text: str) -> str:
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

        script = f"display notification {quoted(note['body'][:240])} with title {quoted(note['title'])}"
        result = self.runner(["osascript", "-e", script], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"osascript exited {result.returncode}")

    # -- the new best, heard from the log ---------------------------------------------------
    def emit(self, record: logging.LogRecord) -> None:
        event = record.msg if isinstance(record.msg, dict) else None
        if self._busy or not event or event.get("event") != "train.eval" or not event.get("best"):
            return
        if "new_best" not in self.cfg.events:
            return
        self._busy = True
        try:
            report = {"best_val_loss": event.get("val_loss")}
            if event.get("val_accuracy") is not None:
                report["best_val_accuracy"] = event["val_accuracy"]
            self.send("new_best", None, report, event.get("step"))
        finally:
            self._busy = False

    def _info(self, name: str, **fields) -> None:
        self._log("info", name, fields)

    def _warn(self, name: str, **fields) -> None:
        self._log("warning", name, fields)

    def _log(self, level: str, name: str, fields: dict) -> None:
        """Log through the run's logger (this handler ignores its own lines meanwhile), or
        say a failure on stderr before the log exists."""
        if self.log_ is None:
            if level == "warning":
                print(f"mathlora-daemon: {name}: {fields.get('route')}: {fields.get('error')}", file=sys.stderr)
            return
        self._busy, busy = True, self._busy
        try:
            getattr(self.log_, level)(name, **fields)
        finally:
            self._busy = busy

def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _safe_error(exc: BaseException, urls: list[str]) -> str:
    """The error's text with every configured URL (and its parts) taken out."""
    text = f"{type(exc).__name__}: {exc}"[:300]
    for url in urls:
        text = text.replace(url, f"{_scheme(url)}://<hidden>")
        rest = url.split("://", 1)[-1]
        for part in filter(None, rest.replace("@", "/").replace(":", "/").split("/")):
            if len(part) >= 4:
                text = text.replace(part, "<hidden>")
    return text


def notify_settings(config_path: Path | None, overrides: list[str]):
    """The [notify] section even when the rest of the config is invalid (a configuration
    error is one of the ends to tell about); None when it cannot be read either."""
    from mathlora_daemon.config import load_config

    try:
        return load_config(config_path, overrides).notify
    except Exception:  # noqa: BLE001 - the rest of the config is what failed; try the section alone
        pass
    try:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        table = tomllib.loads(Path(config_path).read_text()).get("notify") if config_path else None
        mine = [o for o in overrides if o.strip().startswith("notify.")]
        sets = [f"notify.{k}={json.dumps(v)}" for k, v in (table or {}).items()] + mine
        return load_config(None, sets).notify
    except Exception:  # noqa: BLE001
        return None
