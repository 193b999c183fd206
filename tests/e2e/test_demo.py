"""The README's demo command, whole, as a first-time user runs it: prepare, train with
a SIGTERM and a resume, evaluate base vs tuned on the 60 held-out problems, and print
what to try next. The shipped base model must come out measurably better.
"""

from __future__ import annotations

import json
import re

from runs import cli


def test_the_demo_trains_a_measurably_better_model_and_says_what_to_do_next(tmp_path):
    run = tmp_path / "demo"
    result = cli("demo", "--run-dir", str(run), timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "Traceback" not in out

    # The morning report: accuracy and format, base -> adapters, on the held-out problems.
    m = re.search(r"eval\s+60 validation problems: accuracy ([\d.]+)% -> ([\d.]+)%, "
                  r"format ([\d.]+)% -> ([\d.]+)%", out)
    assert m, out[-4000:]
    base_acc, tuned_acc, base_fmt, tuned_fmt = map(float, m.groups())
    assert tuned_acc >= base_acc + 15, m.group(0)  # measured: 0.0% -> 35.0% on two CPU cores
    assert tuned_fmt >= 80 and base_fmt <= 10, m.group(0)  # measured: 0.0% -> 100.0%
    record = json.loads((run / "state" / "status.json").read_text())
    assert record["report"]["final_eval"]["adapters"]["accuracy"] == tuned_acc / 100

    # The SIGTERM at step 30 and the resume happened, and the best adapters were kept.
    assert "SIGTERM at step 30" in out and "reason='signal SIGTERM'" in out and "start_step=30" in out
    config = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert config["selected"]["rule"] == "lowest validation loss"
    assert config["prompt_format"]["template"] == "chat"

    # Next steps: one command a line, nothing a shell would pipe.
    nxt = out[out.index("next, one at a time:"):].splitlines()[1:]
    commands = [line.strip() for line in nxt if line.strip().startswith("mathlora-daemon ")]
    assert len(commands) >= 3 and not any("|" in c for c in commands), nxt

    # The demo runs again in its own directory (outputs of the commands it suggests included).
    assert cli("plot", run=run).returncode == 0 and (run / "loss.png").is_file()
    again = cli("demo", "--run-dir", str(run), "--prepare-only")
    assert again.returncode == 0, again.stderr
