"""The morning report as a page, through the real CLI and daemon: report.html is written
at a checkpoint and at the end, and `status --html` prints the path of a self-contained
page that holds the figures of `status --json`."""

from __future__ import annotations

import json
import signal
from html.parser import HTMLParser
from pathlib import Path

from mathlora_daemon.runtime.humanize import duration

from runs import TOTAL, cli, copy, finish, hold, start


class Page(HTMLParser):
    """The text, the tags and the src/href values of a page."""

    def __init__(self, path: Path):
        super().__init__()
        self.text, self.tags, self.links = [], [], []
        self.feed(path.read_text(encoding="utf-8"))
        self.close()
        self.words = " ".join(" ".join(self.text).split())

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [value for name, value in attrs if name in ("src", "href")]

    def handle_data(self, data):
        self.text.append(data)


def test_the_page_follows_the_checkpoints_and_the_end_and_holds_the_status_figures(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    page = run / "report.html"

    # A checkpoint rewrites the page: held in step 6, after the checkpoint of step 4.
    proc = hold(run, "micro@6", tmp_path)
    during = Page(page)
    assert "running" in during.words and "newest checkpoint step 4" in during.words
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)

    # The end rewrites it: finished, after a resume.
    finish(start(run))
    ended = Page(page)
    assert "finished" in ended.words and "starts 2" in ended.words and "resumes 1" in ended.words

    # `status --html` refreshes it and prints where it is; it holds what `status --json` says.
    answer = cli("status", "--html", run=run)
    assert answer.returncode == 0, answer.stderr
    assert Path(answer.stdout.strip()) == page
    status = json.loads(cli("status", "--json", run=run).stdout)
    report, shown = status["report"], Page(page)
    assert "script" not in shown.tags and not any(link.startswith(("http:", "https:", "//")) for link in shown.links)
    assert len(shown.links) == 1 and shown.links[0].startswith("data:image/png;base64,")  # the plot, inline
    for figure in (status["state"], report["adapters"], f"step {report['selected_step']} of the {TOTAL} trained",
                   f"{report['best_val_loss']:.4f} (step {report['best_val_step']})", f"{report['base_val_loss']:.4f}",
                   f"used {duration(status['budget_used_s'])} of {duration(status['budget_total_s'])}",
                   f"newest checkpoint step {status['last_checkpoint_step']}"):
        assert figure in shown.words, figure
    assert "http://" not in page.read_text() and "https://" not in page.read_text()
