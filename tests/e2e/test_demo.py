"""The README's demo command, whole, as a first-time user runs it: prepare, train with
a SIGTERM and a resume, evaluate base vs tuned on the 60 held-out problems, and print
what to try next. The shipped base model must come out measurably better, the lines it
prints must work pasted into a shell, and the demo must run again in its directory.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from runs import ENV, cli, track, wait_for


def test_the_demo_trains_a_measurably_better_model_and_says_what_to_do_next(tmp_path):
    run = tmp_path / "my demo"  # a space: every printed path must be quoted to paste
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

    # The SIGTERM once step 30 was logged (the step it kept: 30, or a later one that ended
    # before the signal landed, never the last) and the resume from exactly there
    # happened; the best adapters were kept.
    stopped = re.search(r"the daemon exited with 0 after checkpointing step (\d+)", out)
    assert stopped and 30 <= int(stopped.group(1)) < 75, out[-4000:]
    assert "reason='signal SIGTERM'" in out and f"start_step={stopped.group(1)}" in out
    config = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert config["selected"]["rule"] == "lowest validation loss"
    assert config["prompt_format"]["template"] == "chat"

    # Next steps: one command a line, nothing a shell would pipe, each working as printed
    # (the console script by a path that exists, the run directory quoted).
    tail = result.stdout[result.stdout.index("next, one at a time:"):].splitlines()[1:]
    nxt = [line.strip() for line in tail if line.startswith("  ") and line.strip()]
    assert len(nxt) >= 4 and not any("|" in line for line in nxt), nxt
    commands = {}
    for line in nxt:
        argv = shlex.split(line)
        assert Path(argv[0]).is_absolute() and Path(argv[0]).exists(), line
        if "--run-dir" in argv:
            assert argv[argv.index("--run-dir") + 1] == str(run), line
            commands[argv[argv.index("--run-dir") - 1]] = argv
    assert {"eval", "generate", "logs", "plot"} <= set(commands), nxt
    for name in ("generate", "logs", "plot"):  # eval answers 50 problems twice: minutes, and run above already
        done = subprocess.run(commands[name], capture_output=True, text=True, env=ENV, timeout=300,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0 and "Traceback" not in done.stderr, f"{nxt}\n{done.stderr[-2000:]}"
    assert (run / "loss.png").is_file()
    again = cli("demo", "--run-dir", str(run), "--prepare-only")
    assert again.returncode == 0, again.stderr

    # And again, whole, in the same directory: it used to find the finished run's log,
    # SIGTERM its new daemon at once and exit 241 ("exited with -15"). The cheapest real
    # check of the fix: the second demo starts over, its daemon trains to step 30 and
    # checkpoints on the SIGTERM (exit 0), then the demo is interrupted (Ctrl-C), which
    # saves a second full training and final eval.
    second = track(subprocess.Popen([sys.executable, "-m", "mathlora_daemon", "demo", "--run-dir", str(run)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                                    stdin=subprocess.DEVNULL))
    lines: list[str] = []
    wait_for(lambda: _read_until(second, lines, "starting it again"), second, "the second demo's resume",
             timeout_s=600)
    second.send_signal(signal.SIGINT)  # the demo stops its daemon (SIGTERM: checkpoint, exit 0) and exits
    rest, _ = second.communicate(timeout=120)
    shown = "".join(lines) + rest
    assert "Traceback" not in shown, shown[-4000:]
    assert re.search(r"starting from scratch: removed the previous demo's checkpoints, adapters, .*loss\.png",
                     shown), shown[:2000]
    again_stopped = re.search(r"the daemon exited with 0 after checkpointing step (\d+)", shown)
    assert again_stopped and 30 <= int(again_stopped.group(1)) < 75, shown[-4000:]
    assert "start_step=0" in shown, shown[-4000:]


def _read_until(proc: subprocess.Popen, lines: list[str], text: str) -> bool:
    """A wait_for predicate: read proc's next output line into lines; True once one holds text."""
    line = proc.stdout.readline()
    lines.append(line)
    return text in line
