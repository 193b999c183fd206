"""Errors that end a command with a documented exit code (see docs/DESIGN.md, "Exit codes")."""

EXIT_OK = 0
EXIT_TEMPFAIL = 75  # safe to retry (launchd/systemd restart it)
EXIT_CONFIG = 78  # configuration or input error: a restart cannot fix it


class InputError(Exception):
    """Given bad configuration or input data, carry a message a user can act on.

    The message names the offending key, file or row and what is allowed. Raising it
    must happen before anything in the run directory is modified.
    """

    exit_code = EXIT_CONFIG


class TemporaryFailure(Exception):
    """A failure that a later start can get past (a full disk, an MLX out-of-memory
    error) once the last good checkpoint is safe: exit 75 so launchd retries."""

    exit_code = EXIT_TEMPFAIL
