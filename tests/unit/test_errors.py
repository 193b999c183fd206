"""OSErrors and hub failures become the contract's exit codes with a message that names
the option and path (78: a restart cannot fix it; 75: a later start may succeed)."""

import errno

from mathlora_daemon.errors import InputError, TemporaryFailure, classify_os_error, hub_load_error, is_network_error


def test_permission_and_wrong_file_types_are_input_errors_naming_the_path():
    err = classify_os_error(PermissionError(errno.EACCES, "Permission denied", "/runs/a/daemon.lock"))
    assert isinstance(err, InputError) and err.exit_code == 78
    assert "/runs/a/daemon.lock: Permission denied" in str(err) and "ls -ld" in str(err)
    err = classify_os_error(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"))
    assert isinstance(err, InputError) and "read-only" in str(err)


def test_a_full_disk_is_temporary():
    err = classify_os_error(OSError(errno.ENOSPC, "No space left on device", "/runs/a/cache/x"))
    assert isinstance(err, TemporaryFailure) and err.exit_code == 75 and "free some disk space" in str(err)


def test_the_option_a_path_came_from_is_named(tmp_path):
    afile = tmp_path / "mathlora.toml"
    afile.write_text("x")
    err = classify_os_error(FileExistsError(errno.EEXIST, "File exists", str(afile)),
                            {"--out": afile / "peft", "--run-dir": tmp_path})
    assert str(err).startswith(f"--out {afile / 'peft'}: {afile}: exists as a regular file, not a directory")
    err = classify_os_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "logs")),
                            {"--out": None, "--run-dir": tmp_path})
    assert str(err).startswith(f"--run-dir {tmp_path}: {tmp_path / 'logs'}")


def test_network_failures_anywhere_in_the_chain_are_temporary():
    class OfflineModeIsEnabled(ConnectionError):
        pass

    try:
        try:
            raise OfflineModeIsEnabled("offline")
        except ConnectionError as inner:
            raise ValueError("Couldn't reach 'x/y' on the Hub") from inner
    except ValueError as exc:
        assert is_network_error(exc)
        assert isinstance(hub_load_error("--data hub:x/y", exc), TemporaryFailure)
    unknown = FileNotFoundError("Dataset 'x/nope' doesn't exist on the Hub")
    assert not is_network_error(unknown)
    err = hub_load_error("--data hub:x/nope", unknown)
    assert isinstance(err, InputError) and "--data hub:x/nope could not be loaded" in str(err)
