"""The command line's shape (cli/arguments.py, cli/actions.py, cli/common.py): shared
options wherever a user puts them, one way from options to a config, and help for every
option."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mathlora_daemon.cli import actions, arguments, common, watch
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir


@pytest.mark.parametrize("argv", [
    ["checkpoints", "--run-dir", "D", "list"],
    ["checkpoints", "list", "--run-dir", "D"],
])
def test_shared_options_work_before_and_after_the_action(argv):
    args = arguments.parse(argv)
    assert args.command == "checkpoints" and args.action == "list"
    assert args.run_dir == RunDir(Path("D")) and args.config is None and args.overrides == []


def test_set_options_from_every_level_are_kept_in_order():
    args = arguments.parse(["checkpoints", "--set", "daemon.keep_checkpoints=5", "--config", "a.toml", "prune",
                            "--set", "daemon.keep_checkpoints=2", "--run-dir", "R", "--keep", "1"])
    assert args.overrides == ["daemon.keep_checkpoints=5", "daemon.keep_checkpoints=2"]  # the later one wins
    assert args.config == Path("a.toml") and args.run_dir == RunDir(Path("R")) and args.keep == 1


def test_defaults_when_no_shared_option_is_given():
    assert arguments.parse(["status"]).run_dir == RunDir(Path("."))
    assert arguments.parse(["demo"]).run_dir == RunDir(Path(arguments.DEMO_DIR))
    assert arguments.parse(["run"]).overrides == []


def test_the_run_directory_is_built_once_and_run_debug_gets_its_debug_variant():
    # The CLI builds the one RunDir every layer below receives (docs/DESIGN.md, "Run directory").
    assert arguments.parse(["run", "--run-dir", "D"]).run_dir == RunDir(Path("D"))
    debug = arguments.parse(["run", "--debug", "--run-dir", "D"]).run_dir
    assert debug == RunDir(Path("D"), debug=True) and debug.adapters == Path("D") / "debug" / "adapters"
    assert debug.config == Path("D") / "mathlora.toml"  # the real run's config, --debug or not


def test_commands_that_read_no_config_refuse_config_options():
    with pytest.raises(SystemExit) as info:
        arguments.parse(["pause", "--set", "train.seed=1"])
    assert info.value.code == 2  # argparse's usage error


@pytest.mark.parametrize("command", ["status", "logs"])
def test_status_and_logs_take_config_options_as_readme_says_every_command_does(command):
    args = arguments.parse([command, "--set", "train.seed=1", "--config", "a.toml"])
    assert args.overrides == ["train.seed=1"] and args.config == Path("a.toml")


def test_a_value_that_starts_with_a_dash_gets_a_way_to_write_it(capsys):
    with pytest.raises(SystemExit) as info:
        arguments.parse(["status", "--run-dir", "-dash"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--run-dir=-dash" in err and "./-dash" in err, err
    with pytest.raises(SystemExit):
        arguments.parse(["logs", "-n", "-x"])
    err = capsys.readouterr().err
    assert "--lines=-x" in err and "./-x" not in err, err  # not a path: no ./ form


def test_entry_ignores_sigint_and_sigterm_once_main_has_returned(monkeypatch):
    """A signal arriving while the interpreter shuts down must not replace main()'s exit
    code by a death by signal (-2): entry() ignores both once main() has returned."""
    import signal

    import mathlora_daemon.cli as cli

    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    seen = {}

    def main():
        seen["during"] = signal.getsignal(signal.SIGINT)
        return 3

    monkeypatch.setattr(cli, "main", main)
    monkeypatch.setattr(cli.imports, "hide", lambda: None)  # keep torch and wandb importable in this process
    try:
        with pytest.raises(SystemExit) as info:
            cli.entry()
        assert info.value.code == 3
        assert seen["during"] is saved[0]  # main() itself still gets Ctrl-C
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


def test_every_command_has_an_action_and_every_option_has_help():
    parser = arguments.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == set(actions.COMMANDS)
    missing = []

    def check(p: argparse.ArgumentParser, where: str):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    check(sub, f"{where} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")

    for name, sub in commands.choices.items():
        check(sub, name)
    assert not missing, missing


def test_config_from_reads_the_run_directory_s_file_and_the_overrides(tmp_path):
    RunDir(tmp_path).config.write_text("[train]\nseed = 3\n")
    cfg = common.config_from(arguments.parse(["prepare", "--run-dir", str(tmp_path), "--set", "lora.rank=4"]))
    assert (cfg.train.seed, cfg.lora.rank) == (3, 4)
    with pytest.raises(InputError, match="--config .*nope.toml: no such file"):
        common.config_from(arguments.parse(["prepare", "--config", str(tmp_path / "nope.toml")]))


def test_status_html_writes_the_page_first_and_prints_its_path(tmp_path, capsys):
    assert watch.status(arguments.parse(["status", "--html", "--run-dir", str(tmp_path)])) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == RunDir(tmp_path).report_html and "not started" in path.read_text()
    with pytest.raises(SystemExit) as exc:  # one answer at a time
        arguments.parse(["status", "--json", "--html"])
    assert exc.value.code == 2
    path.unlink()
    path.mkdir()  # a page that cannot be written: the OSError main() turns into 78 (or 75)
    with pytest.raises(OSError):
        watch.status(arguments.parse(["status", "--html", "--run-dir", str(tmp_path)]))
