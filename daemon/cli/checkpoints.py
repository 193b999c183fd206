"""`checkpoints list|verify|prune`: look at and tidy a run's checkpoints without MLX.

Human output is a table; `--json` prints one JSON document. `verify` exits 1 when any
checkpoint fails, so scripts can gate on it. `prune` runs only under the run's lock.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import TextIO

from mathlora_checkpoints.store import CheckpointInfo, list_checkpoints, manifest_problem, prune, verify_checkpoint
from mathlora_daemon.cli.common import config_from, positive
from mathlora_daemon.errors import InputError, TemporaryFailure
from mathlora_daemon.runtime import humanize


def checkpoints(args: Namespace) -> int:
    """The command: the action on the run's checkpoints (daemon.keep_checkpoints, or
    --keep, for prune), its exit code."""
    from mathlora_daemon.runtime.lock import LockHeld, acquire_lock

    cfg = config_from(args)
    positive(getattr(args, "keep", None), "--keep", 1)
    keep = getattr(args, "keep", None) or cfg.daemon.keep_checkpoints
    root = args.run_dir.checkpoints
    if args.action != "prune":
        return checkpoints_command(args.action, root, keep, as_json=args.json, out=sys.stdout)
    # A daemon may be resuming from the very checkpoint prune would remove: prune only
    # under the run's lock (the store's retention rule assumes it).
    try:
        lock = acquire_lock(args.run_dir, retries=0.2)
    except LockHeld as exc:
        stop = shlex.join(["mathlora-daemon", "stop", "--run-dir", str(args.run_dir.root)])  # quoted: it pastes
        raise TemporaryFailure(f"{exc}; stop it first (`{stop}`): it prunes its own checkpoints as it trains") from None
    except FileNotFoundError:
        raise InputError(f"--run-dir {args.run_dir.root}: no such directory") from None
    with lock:
        return checkpoints_command("prune", root, keep, as_json=args.json, out=sys.stdout)


def _row(info: CheckpointInfo, problem: str | None = None, checked: bool = False) -> dict:
    row = {"step": info.step, "path": str(info.path), "bytes": info.bytes, "eval_loss": info.eval_loss,
           "created": info.created}
    if checked:
        row["valid"] = problem is None
        row["problem"] = problem
    return row


def _table(rows: list[dict], out: TextIO, now: float, empty: str = "no checkpoints", pruned: bool = False) -> None:
    if not rows:
        out.write(f"{empty}\n")
        return
    for r in rows:
        when = humanize.ago(r["created"], now) if r["created"] else "?"
        if pruned:  # removed just now: there is no manifest left to read, by design
            status = "  pruned"
        elif "valid" in r:
            status = "  ok" if r["valid"] else f"  INVALID: {r['problem']}"
        else:  # list reads manifests only: say when one cannot be read, without hashing anything
            problem = manifest_problem(Path(r["path"]))
            status = f"  DAMAGED: {problem} (see `checkpoints verify`)" if problem else ""
        loss = f"  eval_loss={r['eval_loss']:.4f}" if r["eval_loss"] is not None else ""
        out.write(f"step {r['step']:>8}  {r['bytes'] / 1e6:9.2f} MB  {when}{loss}{status}\n")


def checkpoints_command(action: str, root: Path, keep: int, as_json: bool, out: TextIO) -> int:
    """Given an action (list, verify, prune), the checkpoints directory and the number
    to keep, print the result and return the exit code (verify: 1 when any fails)."""
    now = time.time()
    if action == "list":
        rows = [_row(i) for i in list_checkpoints(root)]
        out.write(json.dumps({"checkpoints": rows}, indent=2) + "\n") if as_json else _table(rows, out, now)
        return 0
    if action == "verify":
        rows = [_row(i, verify_checkpoint(i.path), checked=True) for i in list_checkpoints(root)]
        out.write(json.dumps({"checkpoints": rows}, indent=2) + "\n") if as_json else _table(rows, out, now)
        return 0 if all(r["valid"] for r in rows) else 1
    removed = prune(root, keep)
    rows = [_row(i) for i in removed]
    kept = [_row(i) for i in list_checkpoints(root)]
    if as_json:
        out.write(json.dumps({"pruned": rows, "kept": kept}, indent=2) + "\n")
        return 0
    rule = f"the newest {keep} and the best by eval loss"
    if not rows:
        out.write(f"nothing to prune: {len(kept)} checkpoint(s) kept ({rule})\n")
        return 0
    out.write(f"pruned {len(rows)} checkpoint(s):\n")
    _table(rows, out, now, pruned=True)
    out.write(f"{len(kept)} checkpoint(s) kept ({rule})\n")
    return 0
