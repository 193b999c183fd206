"""The chaos soak, short: one tiny training run meets 12 faults, one of every kind (SIGKILL,
SIGTERM, SIGINT, Ctrl-C twice, SIGQUIT, SIGSTOP/SIGCONT, a torn newest checkpoint, a full
disk, `stop`, `pause` + `resume`, `pause` + `stop` through the CLI, a SIGKILL in a validation
pass), restarted the way launchd restarts it, and must end bit-identical to a run that was
never interrupted: same adapters, same loss at every step, `status` finished, every exit
code in the contract, no traceback, every accepted control request acted on.

bench/chaos_soak.py is the soak (its docstring says what it proves); this runs it as a
user would and asserts its verdict. As root the run directory sits on a tmpfs that is
filled for real; otherwise the full disk is the daemon's ENOSPC hook.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from runs import ENV, ROOT

SEED = 3
FAULTS = 12


def soak_kinds() -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location("chaos_soak", ROOT / "bench" / "chaos_soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.KINDS


def test_a_run_survives_a_fault_of_every_kind_and_ends_bit_identical(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos_soak.py"), "--faults", str(FAULTS),
                           "--seed", str(SEED), "--workdir", str(tmp_path / "work"), "--keep", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=ENV, stdin=subprocess.DEVNULL)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    defects = "\n".join(json.dumps(d, default=str)[:1500] for d in report["defects"])
    assert report["defects"] == [], f"{proc.stdout[-3000:]}\n{defects}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["verdict"] == "pass"

    assert set(report["kinds"]) == set(soak_kinds()), "every kind at least once"
    assert report["faults_applied"] >= FAULTS - 2, report["faults"]  # a CLI request before the lock is not applied
    checks = report["checks"]
    assert checks["adapters_identical"] and checks["adapters_sha256"] == checks["reference_sha256"]
    assert checks["losses_identical_last"] and checks["losses_identical_every_occurrence"]
    assert checks["missing_steps"] == [] and checks["steps_logged"] == checks["total_steps"]
    assert checks["status_state"] == "finished"
    assert checks["accepted_never_acted"] == []
    assert report["starts"] >= 8  # the faults really restarted the daemon
