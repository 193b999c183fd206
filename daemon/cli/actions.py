"""Every command's front-end, by name: COMMANDS maps a command to the function that takes
its parsed arguments (cli/arguments.py) and returns the exit code.

The front-ends live by family: training.py (run, prepare, launch), watch.py (status,
logs, pause, resume, stop), checkpoints.py, service.py (install, uninstall), models.py
(convert, export, fuse), evaluation.py (generate, eval, plot, serve) and demo.py; what
they share (the run directory's checks, `config_from`) is common.py. The layers below
return data; the front-ends decide what is printed and the exit code.

Heavy modules (MLX, mlx-lm, torch) are imported inside the commands that need them,
so `status`, `logs` and the control commands answer fast.
"""

from __future__ import annotations

from mathlora_daemon.cli.checkpoints import checkpoints
from mathlora_daemon.cli.demo import demo
from mathlora_daemon.cli.evaluation import evaluate, generate, plot, serve
from mathlora_daemon.cli.models import convert, export, fuse
from mathlora_daemon.cli.service import install, uninstall
from mathlora_daemon.cli.training import launch, prepare, run
from mathlora_daemon.cli.watch import control, logs, status

COMMANDS = {"run": run, "prepare": prepare, "launch": launch, "status": status, "logs": logs, "pause": control,
            "resume": control, "stop": control, "checkpoints": checkpoints, "install": install,
            "uninstall": uninstall, "convert": convert, "export": export, "fuse": fuse, "generate": generate,
            "eval": evaluate, "plot": plot, "demo": demo, "serve": serve}
