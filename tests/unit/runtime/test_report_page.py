"""The morning report as a page (runtime/report_page.py): well-formed, self-contained HTML
that holds every figure of the status it is given, escapes what it did not write, and
whose writer never stops training."""

from __future__ import annotations

import base64
import json
import stat
from html.parser import HTMLParser

import pytest

from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.humanize import duration
from mathlora_daemon.runtime.report_page import Page, render_html, write_html

VOID = {"meta", "img", "br", "hr", "link", "input"}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00fake-plot" * 10

REPORT = {"adapters": "/runs/night/adapters", "steps": 32, "selected_step": 28,
          "selected_rule": "lowest validation loss", "best_val_loss": 1.23456, "best_val_step": 28,
          "base_val_loss": 2.5, "first_loss": 3.25, "recent_loss": 1.5,
          "final_eval": {"n": 12,
                         "base": {"accuracy": 0.25, "format_compliance": 0.5,
                                  "by_kind": {"addition": {"n": 8, "accuracy": 0.375},
                                              "algebra": {"n": 4, "accuracy": 0.0}}},
                         "adapters": {"accuracy": 0.75, "format_compliance": 1.0,
                                      "by_kind": {"addition": {"n": 8, "accuracy": 0.875},
                                                  "algebra": {"n": 4, "accuracy": 0.5}}}}}
STATUS = {"run": "night", "state": "finished", "reason": "finished", "run_dir": "/runs/night", "step": 32,
          "total_steps": 32, "budget_used_s": 5025.4, "budget_total_s": 57600.0, "budget_left_s": 52574.6,
          "last_checkpoint_step": 32, "last_checkpoint_at": "2026-01-01T06:00:00Z", "report": REPORT,
          "last_end": {"state": "finished", "reason": "finished", "step": 32, "ended_unix": 1767247200.0},
          "log_path": "/runs/night/logs/daemon.jsonl"}


class Strict(HTMLParser):
    """Parses a page and fails on what a browser would have to repair: a closing tag that
    closes nothing open, an element left open, a bad declaration."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open, self.tags, self.attrs, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(tag, name, value) for name, value in attrs]
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)

    def error(self, message):  # pragma: no cover - older Pythons
        raise AssertionError(message)


def parse(page: str) -> Strict:
    assert page.startswith("<!DOCTYPE html>")
    parser = Strict()
    parser.feed(page)
    parser.close()
    assert parser.open == [], f"left open: {parser.open}"
    return parser


def text_of(page: str) -> str:
    return " ".join(" ".join(parse(page).text).split())


def test_the_page_is_well_formed_self_contained_and_holds_every_figure():
    page = render_html(STATUS, PNG, history={"starts": 3, "resumes": 2, "checkpoints_kept": 2}, now=1767250000.0)
    parsed = parse(page)
    text = " ".join(" ".join(parsed.text).split())
    assert {"html", "head", "title", "style", "body", "table", "img"} <= set(parsed.tags)
    assert "script" not in parsed.tags and "link" not in parsed.tags
    assert "http://" not in page and "https://" not in page  # nothing fetched from anywhere
    assert [v for tag, name, v in parsed.attrs if name in ("src", "href")] == [
        "data:image/png;base64," + base64.b64encode(PNG).decode()]
    for figure in ("night", "finished", "/runs/night/adapters", "step 28 of the 32 trained", "lowest validation loss",
                   "validation loss 2.5000 1.2346 (step 28) -50.6%",
                   "training loss 3.2500 at step 1 -> 1.5000",
                   "accuracy (12 problems) 25.0% 75.0%", "format compliance 50.0% 100.0%",
                   "addition (8) 37.5% 87.5%", "algebra (4) 0.0% 50.0%",  # the final eval, per kind
                   f"used {duration(5025.4)} of {duration(57600.0)}, {duration(52574.6)} left",
                   "starts 3", "resumes 2", "newest checkpoint step 32", "checkpoints kept 2", "step 32 of 32 (100.0%)",
                   "/runs/night/logs/daemon.jsonl"):
        assert figure in text, figure
    assert "warning" not in page.split("</style>")[1]  # the adapters beat the base model


def test_what_the_page_did_not_write_is_escaped():
    hostile = "<script>alert('x')</script>"
    status = {**STATUS, "run": hostile, "reason": 'a "quoted" & <b>bold</b> reason', "state": "failed",
              "report": {**REPORT, "adapters": f"/tmp/{hostile}"}}
    page = render_html(status, None, note="no plot: <img src=x>")
    parsed = parse(page)
    assert "script" not in parsed.tags and "b" not in parsed.tags and parsed.tags.count("img") == 0
    text = " ".join(parsed.text)
    assert hostile in text and 'a "quoted" & <b>bold</b> reason' in text and "no plot: <img src=x>" in text


def test_grpo_accuracy_and_rewards_and_a_warning_when_nothing_beat_the_start():
    report = {"adapters": "/r/adapters", "steps": 10, "selected_step": 10, "method": "grpo", "best_val_loss": 0.6,
              "base_val_loss": 0.6, "best_val_accuracy": 0.4, "base_val_accuracy": 0.4, "best_val_step": 0,
              "first_reward": 0.125, "recent_reward": 0.375}
    text = text_of(render_html({"state": "finished", "report": report, "run": "rl"}))
    assert "validation accuracy 40.0% 40.0% (step 0) +0.0 points" in text
    assert "reward 0.125 at step 1 -> 0.375" in text
    assert "No checkpoint beat the starting point" in text and "the last step" in text


def test_a_live_run_shows_its_validation_loss_and_the_plot_note():
    status = {"state": "running", "phase": "training", "run": "n", "step": 8, "total_steps": 32, "epoch": 1,
              "val_loss": 3.5, "val_step": 8, "best_val_loss": 3.25, "best_val_step": 4, "base_val_loss": 4.0}
    text = text_of(render_html(status, None, note="no plot yet: no training step logged"))
    assert "running, phase training" in text and "step 8 of 32 (25.0%), epoch 1" in text
    assert "validation loss 3.5000 at step 8" in text and "best 3.2500 at step 4" in text
    assert "base model 4.0000" in text and "no plot yet: no training step logged" in text


@pytest.fixture
def run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "night")
    run.state.mkdir(parents=True)
    run.status_file.write_text(json.dumps({**STATUS, "pid": 1, "updated_unix": 1.0}))
    return run


def test_the_page_is_written_atomically_user_only_from_the_status_of_the_run(run):
    calls = []

    def figures(given):
        calls.append(given)
        return {"png": PNG, "note": None, "starts": 1, "resumes": 0}

    path = Page(run, figures).write()
    assert path == run.report_html and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir() if "report" in p.name] == ["report.html"]  # no temporary left
    text = text_of(path.read_text())
    assert "finished" in text and "1.2346 (step 28)" in text and "starts 1" in text and calls == [run]
    assert write_html(run, {"state": "not_started"}) == run.report_html  # the plain writer: same file


def test_the_plot_is_redrawn_at_most_every_minute_while_training_and_always_at_an_end(run):
    now, calls = [0.0], []
    page = Page(run, lambda _run: calls.append(now[0]) or {"png": PNG}, clock=lambda: now[0])
    page.refresh()
    now[0] = 30.0
    page.refresh()  # a checkpoint 30 s later: the same drawing
    assert calls == [0.0] and "data:image/png" in run.report_html.read_text()
    now[0] = 61.0
    page.refresh()
    now[0] = 62.0
    page.refresh(final=True)
    assert calls == [0.0, 61.0, 62.0]


def test_a_page_that_cannot_be_written_is_logged_and_never_raised(run, recording_log):
    run.report_html.mkdir()  # a directory where the page belongs
    assert Page(run, None, log=recording_log).refresh() is None
    assert recording_log.names() == ["report.html.failed"]
    with pytest.raises(OSError):
        Page(run).write()  # `status --html` reports it (exit 78 or 75)


def test_a_figures_callable_that_fails_costs_the_plot_not_the_page(run):
    def broken(_run):
        raise PermissionError("logs/daemon.jsonl")

    text = text_of(Page(run, broken).write().read_text())
    assert "no plot: PermissionError: logs/daemon.jsonl" in text and "1.2346" in text
