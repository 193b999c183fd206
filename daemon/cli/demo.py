"""The `demo` command's front-end: the offline walk-through (demo/walkthrough.py) in the
run directory it is given (default: ./mathlora-demo)."""

from __future__ import annotations

from argparse import Namespace


def demo(args: Namespace) -> int:
    from mathlora_daemon.demo.walkthrough import run_demo

    return run_demo(args.run_dir, prepare_only=args.prepare_only)
