"""Leftovers of atomic writes: a writer killed mid-write leaves `.tmp-<pid>-<name>` in
the directory; start-up removes those of dead writers and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys

from mathlora_checkpoints.fsio import atomic_write_text, remove_dead_temporaries


def test_temporaries_of_dead_writers_are_removed_and_everything_else_kept(tmp_path):
    # A real dead writer: a process that has exited and been reaped.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # A real live writer, still at work.
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        adapters = tmp_path / "adapters"
        adapters.mkdir()
        atomic_write_text(adapters / "adapter_config.json", "{}\n")
        names = {
            f".tmp-{dead.pid}-adapters.safetensors": "removed",  # the final write, killed
            f".tmp-{live.pid}-adapters.safetensors": "kept",     # a writer at work now
            f".tmp-{os.getpid()}-adapters.safetensors": "removed",  # an earlier process with our id
            "adapters.safetensors": "kept",
            "notes.txt": "kept",
            ".tmp-mine": "kept",            # not a writer's temporary
            ".tmp-12x-adapters.safetensors": "kept",
            f".tmp-{dead.pid}-": "kept",
        }
        for name in names:
            (adapters / name).write_bytes(b"x")
        (adapters / f".tmp-{dead.pid}-dir").mkdir()  # atomic_write_via writes files only

        removed = remove_dead_temporaries(adapters)

        assert sorted(p.name for p in removed) == sorted(n for n, fate in names.items() if fate == "removed")
        left = {p.name for p in adapters.iterdir()}
        assert left == {n for n, fate in names.items() if fate == "kept"} | {"adapter_config.json",
                                                                             f".tmp-{dead.pid}-dir"}
        assert remove_dead_temporaries(adapters) == []
        assert remove_dead_temporaries(tmp_path / "missing") == []
    finally:
        live.communicate(b"")


def test_the_liveness_check_is_injected(tmp_path):
    (tmp_path / ".tmp-4242-adapters.safetensors").write_bytes(b"x")
    (tmp_path / ".tmp-4343-adapter_config.json").write_bytes(b"x")
    asked = []
    removed = remove_dead_temporaries(tmp_path, pid_alive=lambda pid: asked.append(pid) or pid == 4242)
    assert sorted(asked) == [4242, 4343]
    assert [p.name for p in removed] == [".tmp-4343-adapter_config.json"]
