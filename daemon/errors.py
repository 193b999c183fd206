"""Errors that end a command with a documented exit code (see DESIGN.md, "Exit codes")."""

EXIT_OK = 0
EXIT_TEMPFAIL = 75  # safe to retry (launchd/systemd restart it)
EXIT_CONFIG = 78  # configuration or input error: a restart cannot fix it


class InputError(Exception):
    """Given bad configuration or input data, carry a message a user can act on.

    The message names the offending key, file or row and what is allowed. Raising it
    must happen before anything in the run directory is modified.
    """

    exit_code = EXIT_CONFIG
