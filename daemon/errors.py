"""Errors that end a command with a documented exit code (see docs/DESIGN.md, "Exit codes")."""

import errno

EXIT_OK = 0
EXIT_TEMPFAIL = 75  # safe to retry (launchd/systemd restart it)
EXIT_CONFIG = 78  # configuration or input error: a restart cannot fix it
EXIT_INTERRUPTED = 130  # a second Ctrl-C: at once, without a checkpoint of the unfinished step


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


# errno values a later start can get past (space freed, a peer back, a lock released);
# every other OSError (permission, read-only file system, a file where a directory
# belongs ...) stays until a person fixes it, so a restart would only loop.
_TEMPORARY_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EAGAIN", "EBUSY", "EINTR", "ETIMEDOUT", "ECONNRESET",
                                      "ECONNREFUSED", "ECONNABORTED", "ENETDOWN", "ENETUNREACH", "EHOSTUNREACH",
                                      "EHOSTDOWN", "ENOMEM", "EMFILE", "ENFILE", "EIO")
    if hasattr(errno, name))


def os_error_message(exc: OSError, options: dict[str, object] | None = None) -> str:
    """Given an OSError and the command's path options ({"--out": Path, ...}), return one
    line naming the option the path came from, the path(s) and the reason, with what to do."""
    from pathlib import Path

    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EEXIST and exc.filename is not None and Path(exc.filename).is_file():
        reason = "exists as a regular file, not a directory"
    for option, value in (options or {}).items():
        if value is None or exc.filename is None:
            continue
        given, failed = Path(str(value)), Path(str(exc.filename))
        if failed == given or failed in given.parents or given in failed.parents:
            where = f"{option} {value}: {where}" if failed != given else f"{option} {where}"
            break
    hint = {
        errno.EACCES: "check the owner and mode of that path (ls -ld), or choose another --run-dir",
        errno.EPERM: "check the owner and mode of that path (ls -ld), or choose another --run-dir",
        errno.EROFS: "the file system is mounted read-only; choose a writable --run-dir",
        errno.ENOTDIR: "a regular file stands where a directory belongs",
        errno.EISDIR: "a directory stands where a regular file belongs",
        errno.ENOSPC: "free some disk space; nothing written so far is lost",
        errno.EDQUOT: "the disk quota is exhausted; free some space",
    }.get(exc.errno)
    text = f"{where}: {reason}" if where else reason
    return f"{text} ({hint})" if hint else text


def classify_os_error(exc: OSError, options: dict[str, object] | None = None) -> InputError | TemporaryFailure:
    """Given an OSError a command did not handle, return the contract error it is: a
    temporary failure (75: disk full, network, resources) or an input error (78:
    permissions, read-only, wrong file type, missing path) that a restart cannot fix."""
    message = os_error_message(exc, options)
    if exc.errno in _TEMPORARY_ERRNOS or isinstance(exc, (TimeoutError, ConnectionError)):
        return TemporaryFailure(message)
    return InputError(message)


def is_network_error(exc: BaseException) -> bool:
    """Given an exception from a hub download (datasets, huggingface_hub, requests),
    return whether a network failure is anywhere in its chain: no connection, offline
    mode, a timeout. Those are temporary (75); an unknown dataset or split is not."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        name = type(exc).__name__
        if isinstance(exc, (ConnectionError, TimeoutError)) or name in (
                "OfflineModeIsEnabled", "ConnectTimeout", "ReadTimeout", "ConnectError", "LocalEntryNotFoundError"):
            return True
        if "Couldn't reach" in str(exc) or "offline mode" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def hub_load_error(what: str, exc: BaseException) -> InputError | TemporaryFailure:
    """Given what was being loaded (it names the key or option) and the exception,
    return a TemporaryFailure for a network failure (exit 75: retry later, a restart may
    succeed) or an InputError (78) for anything else."""
    if is_network_error(exc):
        return TemporaryFailure(f"{what} could not be downloaded (network unreachable or offline; a later "
                                f"start retries): {exc}")
    return InputError(f"{what} could not be loaded: {exc}")
