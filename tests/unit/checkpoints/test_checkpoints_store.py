"""Checkpoint store: atomic save, verification, fallback, crash/kill safety, retention."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save

from mathlora_checkpoints import fsio, store
from mathlora_checkpoints.store import CheckpointError, CheckpointInfo

from runs import ROOT, wait_for

# --------------------------------------------------------------------------- helpers


def adapters(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"model.layers.{i}.self_attn.{proj}.lora_{ab}": rng.standard_normal(
            (16, 4) if ab == "a" else (4, 16)
        ).astype(np.float32)
        for i in range(2)
        for proj in ("q_proj", "v_proj")
        for ab in ("a", "b")
    }


def optimizer(seed: int, step: int) -> dict[str, np.ndarray]:
    tensors = {f"{moment}.{k}": v * 0.1 for k, v in adapters(seed).items() for moment in ("m", "v")}
    tensors["step"] = np.array(step, dtype=np.int64)
    return tensors


def raw_group(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return save({"rng_keys": rng.integers(0, 2**62, size=(3, 2), dtype=np.int64),
                 "scale": np.array([1.5, -2.0], dtype=np.float16)})


def state(step: int, eval_loss: float | None = None) -> dict:
    out = {"global_step": step, "epoch": 0, "cursor": step * 8, "seed": 0, "budget_used_s": 12.5}
    if eval_loss is not None:
        out["eval_loss"] = eval_loss
    return out


def save_step(root: Path, step: int, eval_loss: float | None = None, **kw) -> CheckpointInfo:
    groups = {"adapters": adapters(step), "optimizer": optimizer(step, step), "rng": raw_group(step)}
    return store.save_checkpoint(root, step, groups, state(step, eval_loss), **kw)


def tmp_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-")) if root.exists() else []


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def steps(infos) -> list[int]:
    return [info.step for info in infos]


# --------------------------------------------------------------------------- save / load


def test_save_verify_load_roundtrip(tmp_path):
    root = tmp_path / "run" / "checkpoints"  # parents do not exist yet
    groups = {"adapters": adapters(1), "optimizer": optimizer(1, 12), "rng": raw_group(1)}
    info = store.save_checkpoint(root, 12, groups, state(12, eval_loss=1.25))

    assert info.path == root / "step-00000012"
    assert info.step == 12 and info.eval_loss == 1.25
    assert info.bytes == sum(p.stat().st_size for p in info.path.iterdir())
    assert abs(info.created - time.time()) < 60
    assert sorted(os.listdir(info.path)) == [
        "MANIFEST.json", "adapters.safetensors", "optimizer.safetensors", "rng.safetensors",
        "trainer_state.json",
    ]
    assert store.verify_checkpoint(info.path) is None

    loaded_state, files = store.load_checkpoint(info.path)
    assert loaded_state == state(12, eval_loss=1.25)
    assert files == {g: info.path / f"{g}.safetensors" for g in ("adapters", "optimizer", "rng")}
    for group in ("adapters", "optimizer"):
        back = load_file(files[group])
        assert back.keys() == groups[group].keys()
        for key, value in groups[group].items():
            assert back[key].dtype == value.dtype and back[key].shape == value.shape
            np.testing.assert_array_equal(back[key], value)
    assert load_file(files["optimizer"])["step"].dtype == np.int64
    assert files["rng"].read_bytes() == groups["rng"]  # raw bytes are stored verbatim

    text = (info.path / "trainer_state.json").read_text()
    assert text == json.dumps(state(12, 1.25), sort_keys=True, indent=2) + "\n"

    assert stat.S_IMODE(info.path.stat().st_mode) == 0o700
    for f in info.path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert tmp_entries(root) == []
    assert store.list_checkpoints(root) == [info]


def test_bfloat16_group_from_mlx_bytes_roundtrips(tmp_path):
    import mlx.core as mx
    weights = {"lora_a": mx.arange(12, dtype=mx.float32).reshape(3, 4).astype(mx.bfloat16)}
    buf = io.BytesIO()
    mx.save_safetensors(buf, weights)
    info = store.save_checkpoint(tmp_path, 3, {"adapters": buf.getvalue()}, {"global_step": 3})
    _, files = store.load_checkpoint(info.path)
    back = mx.load(str(files["adapters"]))
    assert back["lora_a"].dtype == mx.bfloat16
    assert mx.array_equal(back["lora_a"], weights["lora_a"]).item()


def test_array_likes_and_non_contiguous_arrays_are_accepted(tmp_path):
    import mlx.core as mx

    transposed = np.arange(12, dtype=np.float64).reshape(3, 4).T
    group = {"t": transposed, "mlx": mx.arange(6, dtype=mx.float32), "flag": np.array(True)}
    info = store.save_checkpoint(tmp_path, 1, {"adapters": group}, {})
    back = load_file(store.load_checkpoint(info.path)[1]["adapters"])
    np.testing.assert_array_equal(back["t"], transposed)
    np.testing.assert_array_equal(back["mlx"], np.arange(6, dtype=np.float32))
    assert back["flag"].shape == () and back["flag"].dtype == np.bool_

    with pytest.raises(TypeError, match="safetensors bytes"):  # numpy has no bfloat16
        store.save_checkpoint(tmp_path, 2, {"adapters": {"w": mx.ones((2,), dtype=mx.bfloat16)}}, {})
    assert steps(store.list_checkpoints(tmp_path)) == [1] and tmp_entries(tmp_path) == []


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    root = tmp_path / "checkpoints"
    with pytest.raises(ValueError, match="group name"):
        store.save_checkpoint(root, 1, {"../evil": adapters(1)}, state(1))
    with pytest.raises(ValueError, match="not a safetensors file"):
        store.save_checkpoint(root, 1, {"adapters": b"\x00" * 3 + b"pickle?"}, state(1))
    with pytest.raises(TypeError, match="JSON"):
        store.save_checkpoint(root, 1, {"adapters": adapters(1)}, {"rng": object()})
    with pytest.raises(ValueError, match="step"):
        store.save_checkpoint(root, -1, {"adapters": adapters(1)}, state(1))
    assert not root.exists()


def test_saving_over_a_valid_checkpoint_raises_and_keeps_it(tmp_path):
    info = save_step(tmp_path, 5)
    before = snapshot(info.path)
    with pytest.raises(FileExistsError):
        store.save_checkpoint(tmp_path, 5, {"adapters": adapters(99)}, state(5))
    assert snapshot(info.path) == before
    assert tmp_entries(tmp_path) == []


def test_torn_leftover_with_the_same_step_is_replaced(tmp_path):
    torn = tmp_path / "step-00000005"
    torn.mkdir()
    (torn / "adapters.safetensors").write_bytes(b"half a file")  # no manifest: not a checkpoint
    info = save_step(tmp_path, 5)
    assert store.verify_checkpoint(info.path) is None
    np.testing.assert_array_equal(
        load_file(info.path / "adapters.safetensors")["model.layers.0.self_attn.q_proj.lora_a"],
        adapters(5)["model.layers.0.self_attn.q_proj.lora_a"],
    )
    assert tmp_entries(tmp_path) == []


# --------------------------------------------------------------------------- corruption


def _truncate(ckpt: Path):
    f = ckpt / "adapters.safetensors"
    f.write_bytes(f.read_bytes()[:-10])


def _flip(ckpt: Path):
    f = ckpt / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _missing(ckpt: Path):
    (ckpt / "adapters.safetensors").unlink()


def _no_manifest(ckpt: Path):
    (ckpt / "MANIFEST.json").unlink()


def _extra(ckpt: Path):
    (ckpt / "notes.txt").write_text("hello")


def _garbage_manifest(ckpt: Path):
    (ckpt / "MANIFEST.json").write_bytes(b"{\"files\": [oops")


def _wrong_dir(ckpt: Path):
    (ckpt / "MANIFEST.json").unlink()  # step-2 becomes a copy of step-1 under step-2's name
    for f in (ckpt.parent / "step-00000001").iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (_truncate, "size mismatch for adapters.safetensors: expected"),
        (_flip, "sha256 mismatch for optimizer.safetensors"),
        (_missing, "missing file adapters.safetensors"),
        (_no_manifest, "no MANIFEST.json"),
        (_extra, "unexpected file notes.txt"),
        (_garbage_manifest, "MANIFEST.json unreadable"),
        (_wrong_dir, "step in manifest 1 != directory name 2"),
    ],
    ids=["truncated", "flipped-byte", "missing-file", "no-manifest", "extra-file",
         "garbage-manifest", "wrong-step"],
)
def test_corruption_is_detected_and_restore_falls_back(tmp_path, corrupt, reason):
    first = save_step(tmp_path, 1)
    second = save_step(tmp_path, 2)
    before = snapshot(first.path)
    corrupt(second.path)

    got = store.verify_checkpoint(second.path)
    assert got is not None and got.startswith(reason), got

    rejected = []
    latest = store.find_latest_valid(tmp_path, on_rejected=lambda p, why: rejected.append((p, why)))
    assert latest is not None and latest.path == first.path
    assert rejected == [(second.path, got)]
    assert second.path.exists()  # reported, never deleted by restore
    with pytest.raises(CheckpointError, match=reason.split(":")[0]):
        store.load_checkpoint(second.path)
    assert snapshot(first.path) == before
    assert store.load_checkpoint(first.path)[0] == state(1)


def test_no_valid_checkpoint_gives_none(tmp_path):
    assert store.find_latest_valid(tmp_path / "absent") is None
    info = save_step(tmp_path, 1)
    _no_manifest(info.path)
    assert store.find_latest_valid(tmp_path) is None


# --------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("fail_at", [1, 2, 5])  # first group, second group, the manifest
def test_disk_full_during_save_leaves_earlier_checkpoints_alone(tmp_path, fail_at):
    first = save_step(tmp_path, 1)
    before = snapshot(first.path)
    calls = []

    def full_disk_writer(path: Path, data: bytes) -> None:
        calls.append(path.name)
        if len(calls) == fail_at:
            fsio.write_bytes_durable(path, data[: len(data) // 2])  # part of it made it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        fsio.write_bytes_durable(path, data)

    with pytest.raises(OSError) as excinfo:
        save_step(tmp_path, 2, writer=full_disk_writer)
    assert excinfo.value.errno == errno.ENOSPC
    assert len(calls) == fail_at and (fail_at != 5 or calls[-1] == "MANIFEST.json")

    assert tmp_entries(tmp_path) == []
    assert not (tmp_path / "step-00000002").exists()
    assert steps(store.list_checkpoints(tmp_path)) == [1]
    assert store.verify_checkpoint(first.path) is None
    assert snapshot(first.path) == before
    assert save_step(tmp_path, 2).step == 2  # space freed: the next save works


# --------------------------------------------------------------------------- SIGKILL


def _run_until_marker(script: str, *args: str) -> subprocess.Popen:
    """Start `script` in a real Python process and return it once it has written the
    marker file given as its last argument (it then blocks in signal.pause())."""
    marker = Path(args[-1])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        wait_for(marker.exists, proc, "the child to reach the marker", timeout_s=30)
    except AssertionError:
        proc.kill()
        raise
    return proc


def _sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


SAVE_SCRIPT = """
    import signal, sys
    from pathlib import Path
    import numpy as np
    from mathlora_checkpoints import fsio, store

    root, pause_on, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

    def writer(path, data):
        fsio.write_bytes_durable(path, data)
        if path.name == pause_on:
            marker.write_text(str(path))
            signal.pause()

    groups = {"adapters": {"w": np.ones((64, 8), np.float32)},
              "optimizer": {"m": np.zeros((64, 8), np.float32), "step": np.array(2, np.int64)}}
    store.save_checkpoint(root, 2, groups, {"global_step": 2}, writer=writer)
    sys.exit("save finished although it should have been killed")
"""


@pytest.mark.parametrize("pause_on", ["adapters.safetensors", "MANIFEST.json"])
def test_sigkill_during_save_leaves_only_the_earlier_checkpoint(tmp_path, pause_on):
    first = save_step(tmp_path, 1)
    before = snapshot(first.path)
    marker = tmp_path.parent / f"{tmp_path.name}-marker"

    proc = _run_until_marker(SAVE_SCRIPT, str(tmp_path), pause_on, str(marker))
    _sigkill(proc)

    leftovers = tmp_entries(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-step-00000002")
    assert Path(marker.read_text()).parent.name == leftovers[0]
    assert steps(store.list_checkpoints(tmp_path)) == [1]
    assert store.find_latest_valid(tmp_path).path == first.path
    assert snapshot(first.path) == before

    assert store.cleanup_temporaries(tmp_path) == [tmp_path / leftovers[0]]
    assert tmp_entries(tmp_path) == []
    assert store.verify_checkpoint(first.path) is None
    assert steps(store.list_checkpoints(tmp_path)) == [1]
    assert save_step(tmp_path, 2).step == 2  # the resumed run saves the same step again


PRUNE_SCRIPT = """
    import signal, sys
    from pathlib import Path
    from mathlora_checkpoints import store

    root, marker = Path(sys.argv[1]), Path(sys.argv[2])

    def after_rename(tmp):
        marker.write_text(str(tmp))
        signal.pause()

    store.prune(root, keep=2, _after_rename=after_rename)
    sys.exit("prune finished although it should have been killed")
"""


def test_sigkill_during_prune_leaves_only_valid_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        save_step(tmp_path, step)
    marker = tmp_path.parent / f"{tmp_path.name}-marker"

    proc = _run_until_marker(PRUNE_SCRIPT, str(tmp_path), str(marker))
    _sigkill(proc)

    renamed = Path(marker.read_text())
    assert renamed.name.startswith(".tmp-pruned-step-00000001") and renamed.is_dir()
    infos = store.list_checkpoints(tmp_path)
    assert steps(infos) == [2, 3, 4]  # the victim stopped being a checkpoint at the rename
    assert all(store.verify_checkpoint(info.path) is None for info in infos)

    assert store.cleanup_temporaries(tmp_path) == [renamed]
    pruned = store.prune(tmp_path, keep=2)
    assert steps(pruned) == [2]
    assert steps(store.list_checkpoints(tmp_path)) == [3, 4]
    assert tmp_entries(tmp_path) == []
    assert store.find_latest_valid(tmp_path).step == 4


# --------------------------------------------------------------------------- retention


def infos_for(*steps_losses) -> list[CheckpointInfo]:
    return [
        CheckpointInfo(Path(f"/ck/step-{s:08d}"), s, 100, loss, 1000.0 + s) for s, loss in steps_losses
    ]


def by_step(infos, *wanted):
    return {Path(f"/ck/step-{s:08d}") for s in wanted}


def test_select_keeps_the_newest_n():
    infos = infos_for(*[(s, None) for s in range(1, 6)])
    assert steps(store.select_for_pruning(infos, keep=2)) == [1, 2, 3]
    assert steps(store.select_for_pruning(list(reversed(infos)), keep=2)) == [1, 2, 3]
    assert store.select_for_pruning(infos, keep=10) == []


def test_select_keeps_the_best_eval_loss_even_if_old():
    infos = infos_for((1, 0.5), (2, 0.9), (3, float("nan")), (4, 0.8), (5, None))
    assert steps(store.select_for_pruning(infos, keep=2)) == [2, 3]
    tie = infos_for((1, 0.5), (2, 0.5), (3, 0.7), (4, 0.7))
    assert steps(store.select_for_pruning(tie, keep=1)) == [1, 3]  # newest of equal best


def test_select_never_returns_protected():
    infos = infos_for(*[(s, None) for s in range(1, 6)])
    protect = by_step(infos, 1)
    assert steps(store.select_for_pruning(infos, keep=2, protect=protect)) == [2, 3]


def test_select_invalid_checkpoints_do_not_count_toward_n():
    infos = infos_for((1, None), (2, None), (3, None), (4, 0.1))
    # torn newest: the two newest *valid* ones (2, 3) stay; the torn one stays for inspection
    assert steps(store.select_for_pruning(infos, keep=2, invalid=by_step(infos, 4))) == [1]
    # invalid ones older than the newest valid one go, and cannot be "best"
    assert steps(store.select_for_pruning(infos, keep=1, invalid=by_step(infos, 2, 4))) == [1, 2]
    # nothing valid at all: delete nothing
    assert store.select_for_pruning(infos, keep=1, invalid=by_step(infos, 1, 2, 3, 4)) == []
    with pytest.raises(ValueError):
        store.select_for_pruning(infos, keep=0)


def test_prune_with_a_torn_newest_keeps_the_last_valid_one(tmp_path):
    for step, loss in ((1, 2.0), (2, 1.0), (3, 1.5), (4, 1.7), (5, None)):
        save_step(tmp_path, step, eval_loss=loss)
    _flip(tmp_path / "step-00000005")  # newest is corrupt
    protected = tmp_path / "step-00000001"
    rejected, pruned_events = [], []

    pruned = store.prune(
        tmp_path, keep=1, protect={protected},
        on_pruned=pruned_events.append, on_rejected=lambda p, why: rejected.append(p),
    )
    assert steps(pruned) == [3]  # 1 protected, 2 best eval loss, 4 newest valid, 5 torn
    assert pruned_events == pruned
    assert rejected == [tmp_path / "step-00000005"]
    assert steps(store.list_checkpoints(tmp_path)) == [1, 2, 4, 5]
    assert store.find_latest_valid(tmp_path).step == 4
    assert tmp_entries(tmp_path) == []


def test_list_and_cleanup_ignore_what_is_not_theirs(tmp_path):
    info = save_step(tmp_path, 7, eval_loss=0.25)
    torn = tmp_path / "step-00000009"
    torn.mkdir()
    (torn / "adapters.safetensors").write_bytes(b"x" * 123)
    (tmp_path / "step-12").mkdir()  # not 8 digits
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / ".tmp-step-00000010-1-ab").mkdir()
    (tmp_path / ".tmp-step-00000010-1-ab" / "adapters.safetensors").write_bytes(b"partial")
    (tmp_path / ".tmp-stray-file").write_bytes(b"")

    infos = store.list_checkpoints(tmp_path)
    assert steps(infos) == [7, 9]
    assert infos[0] == info
    assert infos[1].bytes == 123 and infos[1].eval_loss is None
    assert store.list_checkpoints(tmp_path / "absent") == []

    removed = store.cleanup_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-step-00000010-1-ab", ".tmp-stray-file"]
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "step-00000007", "step-00000009", "step-12"]
    assert store.cleanup_temporaries(tmp_path) == []


def test_step_dir_names():
    assert store.step_dir_name(12) == "step-00000012"
    assert store.parse_step_dir("step-00000012") == 12
    assert store.parse_step_dir("step-12") is None
    assert store.parse_step_dir(".tmp-step-00000012") is None
    with pytest.raises(ValueError):
        store.step_dir_name(100_000_000)
    with pytest.raises(ValueError):
        store.step_dir_name(True)
