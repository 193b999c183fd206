"""`demo`: the embedded default, runnable offline in a few minutes on two CPU cores.

Given a run directory, write a tiny Llama-architecture model (tokenizer trained on the
demo data, same layout as a converted model) in `mlx_model/`, synthetic step-by-step
math problems in `data/` (train + held-out test), and a `mathlora.toml` pointing at
them; then train, and show the loss and a generation before and after.

Run again in its own directory, the demo starts its training from scratch: it removes
what the previous demo's training and the commands it suggested wrote (checkpoints,
adapters, state, logs, report, export, fused, loss.png, debug) and says so; the model,
data, config and token cache are kept. Without that, the daemon would find the previous
run finished and the SIGTERM step already logged. The `next:` lines are printed to be
pasted as they are: the console script by its real path, every path shell-quoted.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mathlora_daemon.config import (
    Config,
    DaemonConfig,
    DataConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
    load_config,
    to_toml,
)
from mathlora_daemon.demo.base_model import N_TEST
from mathlora_daemon.demo.mathgen import write_rows
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import CONFIG_FILE, MODEL_DIR, RunDir, entry_names

MARKER = "mathlora-daemon demo run directory"
# What a demo run directory may already hold, the outputs of every command a user may
# try on it included (anything else: refuse, lose nothing).
MODEL_TMP = f".tmp-{MODEL_DIR}"  # the model is written here, then renamed: whole or not at all
DEMO_ENTRIES = entry_names() | {MODEL_TMP}
LEARNING_RATE = 3e-3


def demo_config() -> Config:
    """Return the demo's config: the shipped tiny base model and the synthetic data in
    DeepSeek-Math's chat format, one epoch sized to a couple of minutes on two CPU cores,
    validated and finally evaluated on the 60 held-out problems."""
    return Config(
        # The model is the directory the demo writes: a local path, nothing to download or convert.
        model=ModelConfig(name=MODEL_DIR, path=MODEL_DIR),
        # Paths relative to the run directory, as the config file writes them.
        data=DataConfig(name=RunDir(Path()).demo_train.as_posix(), max_seq_len=256,
                        validation_name=RunDir(Path()).demo_test.as_posix()),
        lora=LoraConfig(rank=16, alpha=32.0, dropout=0.0,
                        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        train=TrainConfig(epochs=1, batch_size=4, grad_accumulation_steps=2, learning_rate=LEARNING_RATE, seed=0,
                          warmup_steps=5, final_eval=N_TEST),
        daemon=DaemonConfig(checkpoint_every_steps=25),
    )


def check_run_dir(run: RunDir) -> None:
    """Given a directory, raise InputError unless it is absent, empty or a demo run
    directory (so the demo never writes over a user's files)."""
    if not run.root.exists():
        return
    if not run.root.is_dir():
        raise InputError(f"--run-dir {run.root}: exists and is not a directory")
    config = run.config
    if config.exists() and MARKER not in config.read_text(errors="replace").splitlines()[0]:
        raise InputError(f"--run-dir {run.root}: holds a {CONFIG_FILE} that is not the demo's; "
                         "choose another directory for the demo")
    foreign = sorted(p.name for p in run.root.iterdir() if p.name not in DEMO_ENTRIES)
    if foreign:
        raise InputError(f"--run-dir {run.root}: not empty ({', '.join(foreign[:5])}); choose an empty or new "
                         "directory for the demo")


def prepare_demo(run: RunDir) -> Config:
    """Given a run directory, write the demo model (the shipped pretrained base), data
    and config there (reusing any already written) and return the config."""
    from mathlora_daemon.demo.base_model import copy_base, demo_splits

    check_run_dir(run)
    run.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not run.demo_train.exists() or not run.demo_test.exists():
        train, test = demo_splits()
        write_rows(run.data, {run.demo_train.name: train, run.demo_test.name: test})
    model = run.model(MODEL_DIR)
    if not (model / "model.safetensors").exists():
        tmp = run.root / MODEL_TMP
        shutil.rmtree(tmp, ignore_errors=True)
        copy_base(tmp)
        os.rename(tmp, model)  # the model appears whole or not at all
    config_path = run.config
    if not config_path.exists():
        config_path.write_text(to_toml(demo_config(), comment=f"{MARKER}: tiny model, synthetic math data.\n"
                                                              "Every key is documented in docs/reference.md."))
    return load_config(config_path)


def training_outputs(run: RunDir) -> list[Path]:
    """Given a demo run directory, return what training and the commands the demo
    suggests write there (what a second demo must not start from)."""
    return [run.checkpoints, run.adapters, run.state, run.log_file.parent, run.report_file, run.report_html,
            run.debug_root, run.export("peft").parent, run.fused, run.plot]


def clear_previous_run(run: RunDir) -> list[str]:
    """Given a demo run directory (check_run_dir passed), remove the previous demo's
    training outputs and return their names; raise InputError while a daemon trains
    there (its files are not ours to remove then)."""
    from mathlora_daemon.runtime.lock import probe_lock

    running, pid = probe_lock(run)
    if running:
        raise InputError(f"--run-dir {run.root}: a daemon (pid {pid}) is training there; stop it first "
                         f"({_command('stop', run)}) or choose another directory for the demo")
    cleared = []
    for path in training_outputs(run):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        cleared.append(path.name)
    return cleared


def console_script() -> list[str]:
    """How to run this very installation from a shell: the `mathlora-daemon` script beside
    the interpreter (a venv's bin/) when there is one, else `python -m mathlora_daemon`
    with this interpreter; absolute, so a pasted line works from any directory."""
    script = Path(sys.executable).parent / "mathlora-daemon"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script.absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "mathlora_daemon"]


def _command(command: str, run: RunDir, *args: str) -> str:
    """One command line to paste: the console script, the command, --run-dir and the
    arguments, every word shell-quoted."""
    return shlex.join([*console_script(), command, "--run-dir", str(run.root), *args])


def _steps_logged(run: RunDir) -> list[dict]:
    path = run.log_file
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"train.step"' in line]


def _train(run: RunDir, interrupt_at: int | None) -> int:
    """Run `mathlora-daemon run` as its own process, as launchd would; with interrupt_at,
    send it SIGTERM once that step is logged. Return its exit code."""
    before = len(_steps_logged(run))  # only steps this daemon logs count
    proc = subprocess.Popen([sys.executable, "-m", "mathlora_daemon", "run", "--run-dir", str(run.root)])
    try:
        while interrupt_at is not None and proc.poll() is None:
            steps = _steps_logged(run)[before:]
            if steps and steps[-1]["step"] >= interrupt_at:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        return proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise


INTERRUPT_AT = 30  # the step at which the demo sends SIGTERM (75 steps in all)
HONEST = """\
What happened: the base model is a 437k-parameter Llama the project pretrained on easy
problems written as "Q: ... A: ... The final answer is $\\boxed{..}$." (75% right that
way; daemon/demo/base/BUILD.json). It had never seen the chat format or the instruction,
so prompted the way DeepSeek-Math-7B-Instruct is prompted it answered nothing right.
LoRA (70k parameters, one epoch of 600 examples, two minutes on two CPU cores) taught it
to answer in that format; the arithmetic is the base model's own, and one epoch moves
only part of it into the new format (tuned accuracy stays below that 75%). On a real
pretrained model the same daemon and settings are measured in bench/LEARNING.md."""


def run_demo(run: RunDir, prepare_only: bool = False) -> int:
    """Given a run directory, prepare the demo and, unless prepare_only, train it the way
    the daemon trains overnight: interrupted once by SIGTERM (checkpoint, exit 0), started
    again (resume), then show `status` with the base model against the adapters on the
    held-out problems, a generation before and after, and what it means. Return the
    exit code."""
    from mathlora_daemon.evaluation.generate import generate_text
    from mathlora_daemon.runtime.status import read_status, render_status

    prepare_demo(run)
    print(f"demo prepared in {run.root}: model {run.model(MODEL_DIR)} (pretrained, shipped with the "
          f"package), data {run.data} ({N_TEST} held-out problems), config {run.config}")
    if prepare_only:
        return 0
    cleared = clear_previous_run(run)
    if cleared:
        print(f"starting from scratch: removed the previous demo's {', '.join(cleared)} in {run.root}")
    test = json.loads(run.demo_test.read_text().splitlines()[1])
    print(f"\nproblem: {test['problem']}\nexpected answer: {test['answer']}\n\nbase model, greedy, "
          "in DeepSeek-Math's chat format:")
    generate_text(run.model(MODEL_DIR), test["problem"], None, max_new_tokens=80, temperature=0.0, out=sys.stdout)

    # Watching the log, the demo sees step 30 as it is written; a fast machine may finish
    # the next step before the signal lands, so what it prints after is the step it kept.
    print(f"\ntraining (mathlora-daemon run); it gets SIGTERM once step {INTERRUPT_AT} is logged, as launchd "
          "would send at logout ...")
    code = _train(run, interrupt_at=INTERRUPT_AT)
    stopped = _steps_logged(run)[-1]["step"] if _steps_logged(run) else 0
    print(f"\nthe daemon exited with {code} after checkpointing step {stopped}; status now:\n")
    sys.stdout.write(render_status(read_status(run)))
    sys.stdout.flush()
    if code != 0:
        return code
    print("\nstarting it again: it resumes from the checkpoint, exactly where it stopped, and at the end "
          f"answers the {N_TEST} held-out problems with and without the adapters ...")
    code = _train(run, interrupt_at=None)
    if code != 0:
        return code
    print(f"\nthe morning report, as `{_command('status', run)}` gives it at any time:\n")
    sys.stdout.write(render_status(read_status(run)))
    sys.stdout.flush()
    final = (read_status(run).get("report") or {}).get("final_eval") or {}
    if final.get("base") and final.get("adapters"):
        print("\nper kind, correct of 10 (base -> adapters):")
        for kind, base in final["base"]["by_kind"].items():
            print(f"  {kind:<20} {base['correct']:>2} -> {final['adapters']['by_kind'][kind]['correct']:>2}")
    print("\nwith adapters, greedy:")
    generate_text(run.model(MODEL_DIR), test["problem"], run.adapters, max_new_tokens=80, temperature=0.0,
                  out=sys.stdout)
    print(f"\n{HONEST}\n\nnext, one at a time:")
    for line in next_commands(run):
        print(f"  {line}")
    return 0


def next_commands(run: RunDir) -> list[str]:
    """The commands the demo suggests, each a line that works pasted into a shell. `plot`
    needs matplotlib, which the demo's install (`.[cpu]`) does not bring: when it is
    missing, the line that installs it comes first."""
    import importlib.util

    lines = [_command("eval", run), _command("generate", run, "--prompt", "Solve for x: 3x + 7 = 22"),
             _command("logs", run, "--event", "train.eval")]
    if importlib.util.find_spec("matplotlib") is None:
        lines.append(shlex.join([str(Path(sys.executable).absolute()), "-m", "pip", "install", "matplotlib"]))
    lines.append(_command("plot", run))
    return lines
