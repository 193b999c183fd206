"""`python -m mathlora_daemon` is the same as the `mathlora-daemon` console script."""

from mathlora_daemon.cli import entry

entry()
