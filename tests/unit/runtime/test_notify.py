"""runtime/notify.py: one message per end with the report's key lines, by Apprise, a
command or macOS's Notification Center; secrets never logged; failures never fatal."""

from __future__ import annotations

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from mathlora_daemon.config import NotifyConfig, load_config
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.notify import Notifier, message, notify_settings
from mathlora_daemon.runtime.report import write_report

REPORT = {"adapters": "/runs/a/adapters", "selected_step": 40, "base_val_loss": 1.25, "best_val_loss": 0.75,
          "final_eval": {"base": {"accuracy": 0.1}, "adapters": {"accuracy": 0.4}}}


class Runner:
    """Records the commands the notifier runs; answers with `code`."""

    def __init__(self, code: int = 0):
        self.calls, self.code = [], code

    def __call__(self, args, **kw):
        self.calls.append((args, kw))
        return subprocess.CompletedProcess(args, self.code, "", "boom" if self.code else "")


def test_the_message_carries_the_report_s_key_lines(tmp_path):
    note = message("finished", RunDir(tmp_path / "night"), None, REPORT, 40)
    assert note["title"] == "mathlora-daemon: night finished at step 40"
    body = note["body"]
    assert "adapters: /runs/a/adapters (step 40)" in body
    assert "val loss: 0.7500 (base 1.2500)" in body
    assert "final eval: 40.0% correct (base 10.0%)" in body
    assert f"mathlora-daemon status --run-dir {tmp_path / 'night'}" in body
    failed = message("failed", RunDir(tmp_path), "crash loop: 3 starts crashed", None)
    assert "why: crash loop" in failed["body"] and "FAILED" in failed["title"]


def test_a_command_gets_the_event_as_json_on_stdin(tmp_path, recording_log):
    run = RunDir(tmp_path)
    runner = Runner()
    notifier = Notifier(NotifyConfig(command="notify-me --flag"), run, recording_log, runner=runner, platform="linux")
    assert notifier.send("budget_exhausted", "budget of 16 h used", REPORT, 40) == ["command"]
    (args, kw), = runner.calls
    assert args == "notify-me --flag" and kw["shell"] and kw["timeout"] > 0
    sent = json.loads(kw["input"])
    assert sent["event"] == "budget_exhausted" and sent["report"]["best_val_loss"] == 0.75 and sent["step"] == 40
    assert ("info", "notify.sent", {"what": "budget_exhausted", "routes": ["command"]}) in recording_log.events
    # An event the config does not ask for is not sent
    assert notifier.send("new_best", None, REPORT, 10) == [] and len(runner.calls) == 1


def test_macos_gets_one_banner_when_nothing_else_is_set(tmp_path, recording_log):
    runner = Runner()
    mac = Notifier(NotifyConfig(), RunDir(tmp_path), recording_log, runner=runner, platform="darwin")
    assert mac.send("finished", None, {**REPORT, "adapters": 'a "quoted" path'}, 40) == ["macos"]
    (args, _), = runner.calls
    assert args[:2] == ["osascript", "-e"] and 'with title "mathlora-daemon:' in args[2]
    assert '\\"quoted\\"' in args[2]  # AppleScript string quoting
    assert Notifier(NotifyConfig(macos=False), RunDir(tmp_path), recording_log, runner=runner,
                    platform="darwin").send("finished", None, REPORT) == []
    assert Notifier(NotifyConfig(), RunDir(tmp_path), recording_log, runner=runner,
                    platform="linux").send("finished", None, REPORT) == []  # Linux: nothing by default


@pytest.fixture
def webhook():
    """A local HTTP server that records the JSON bodies POSTed to it."""
    got = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], got
    server.shutdown()


def test_apprise_urls_deliver_and_their_secrets_stay_out_of_the_log(tmp_path, recording_log, webhook):
    port, got = webhook
    url = f"json://127.0.0.1:{port}/hook-s3cr3t-token"
    notifier = Notifier(NotifyConfig(urls=[url]), RunDir(tmp_path), recording_log, platform="linux")
    assert notifier.send("finished", None, REPORT, 40) == ["apprise:json"]
    assert len(got) == 1 and "val loss: 0.7500 (base 1.2500)" in got[0]["message"]
    assert got[0]["title"].startswith("mathlora-daemon:")
    # A service that fails is one warning that names the service, never the URL.
    dead = "json://127.0.0.1:9/other-s3cr3t-token"
    failing = Notifier(NotifyConfig(urls=[dead]), RunDir(tmp_path), recording_log, platform="linux")
    assert failing.send("failed", "crash loop", None) == []
    warnings = [f for level, e, f in recording_log.events if e == "notify.failed"]
    assert warnings and warnings[0]["route"] == "apprise:json"
    assert "s3cr3t" not in json.dumps(recording_log.events)


def test_a_failing_command_is_a_warning_not_a_crash(tmp_path, recording_log):
    notifier = Notifier(NotifyConfig(command="false"), RunDir(tmp_path), recording_log, runner=Runner(code=3),
                        platform="linux")
    assert notifier.send("stopped", "stop requested", REPORT) == []
    (level, event, fields), = [e for e in recording_log.events if e[1] == "notify.failed"]
    assert level == "warning" and "exited 3" in fields["error"]


def test_the_end_a_start_wrote_is_sent_once(tmp_path, recording_log):
    run = RunDir(tmp_path)
    runner = Runner()
    notifier = Notifier(NotifyConfig(command="x"), run, recording_log, runner=runner, platform="linux")
    write_report(run, "finished", "finished", 12, REPORT, now=1000.0)
    assert notifier.send_end(started_unix=2000.0) == []  # an earlier start's end: not news
    assert notifier.send_end(started_unix=500.0) == ["command"]
    assert json.loads(runner.calls[0][1]["input"])["event"] == "finished"


def test_a_new_best_is_heard_from_the_log_when_asked_for(tmp_path, recording_log):
    import logging

    runner = Runner()
    notifier = Notifier(NotifyConfig(command="x", events=["new_best"]), RunDir(tmp_path), recording_log,
                        runner=runner, platform="linux")
    for best in (False, True):
        notifier.emit(logging.LogRecord("mathlora", logging.INFO, __file__, 1,
                                        {"event": "train.eval", "step": 8, "val_loss": 0.5, "best": best}, None, None))
    assert len(runner.calls) == 1 and json.loads(runner.calls[0][1]["input"])["event"] == "new_best"


def test_the_notify_section_is_read_even_when_the_rest_is_invalid(tmp_path):
    config = tmp_path / "mathlora.toml"
    config.write_text('[train]\nlearning_rate = "fast"\n[notify]\ncommand = "tell-me"\n')
    with pytest.raises(Exception):
        load_config(config)
    assert notify_settings(config, []).command == "tell-me"
    assert notify_settings(config, ['notify.command="other"']).command == "other"
