"""Tests for runtime/imports.py: a daemon process loads its model, tokenizer and
mlx-lm's LoRA layers without importing PyTorch or W&B (both installed here, as the test
extra installs them), and the code that uses one still gets it: the `.bin` conversion
(torch) and the W&B tracker. Each runs a fresh interpreter, as a daemon start is."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from runs import ENV

LOADS_LIKE_A_START = """
import sys
{prelude}
from mlx_lm.utils import load
import mlx_lm.tuner.utils  # LoRA layers (its package imports wandb for a callback)
model, tokenizer = load({model_dir!r})
assert tokenizer.encode("What is 2 + 3?")
print(json.dumps({{name: sys.modules.get(name) is not None for name in ("torch", "wandb")}}))
"""


def imported(model_dir, prelude: str) -> dict:
    code = "import json\n" + textwrap.dedent(LOADS_LIKE_A_START.format(prelude=prelude, model_dir=str(model_dir)))
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_start_through_the_cli_loads_model_tokenizer_and_lora_without_torch_or_wandb(tiny_model_dir):
    # Without the CLI's hide, transformers imports torch on the way to the tokenizer and
    # mlx-lm's tuner imports wandb: the cost this module removes (so the second can fail).
    assert imported(tiny_model_dir, prelude="") == {"torch": True, "wandb": True}
    through_cli = "from mathlora_daemon.runtime import imports; imports.hide()"
    assert imported(tiny_model_dir, prelude=through_cli) == {"torch": False, "wandb": False}


def test_the_wandb_tracker_brings_wandb_back(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from mathlora_daemon.runtime import imports
        imports.hide()
        import mlx_lm.tuner.utils
        assert sys.modules["wandb"] is None
        from mathlora_daemon.rundir import RunDir
        from mathlora_daemon.runtime.trackers import _Wandb
        tracker = _Wandb(RunDir({str(tmp_path / "run")!r}), "mathlora-test", {{}}, {{"lr": 1e-4}})
        tracker.log(1, {{"loss": 1.0}})
        tracker.close()
        print("wandb", sys.modules["wandb"].__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], env={**ENV, "WANDB_MODE": "offline"}, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "wandb wandb" in out.stdout


def test_the_bin_conversion_brings_torch_back(tmp_path):
    # A Hugging Face directory with PyTorch .bin weights only, converted by the real CLI.
    src = tmp_path / "hf-bin"
    make = textwrap.dedent(f"""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from mathlora_daemon.demo.assets import train_tokenizer
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
        out = __import__("pathlib").Path({str(src)!r})
        out.mkdir(parents=True)
        model.config.save_pretrained(out)
        torch.save(model.state_dict(), out / "pytorch_model.bin")
        train_tokenizer(["two plus three is five"] * 20, out, vocab_size=300)
    """)
    subprocess.run([sys.executable, "-c", make], env=ENV, check=True, capture_output=True, timeout=120)
    assert list(src.glob("*.bin")) and not list(src.glob("*.safetensors"))
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "mathlora_daemon", "convert", "--run-dir", str(run), "--source",
                           str(src)], env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "mlx_model" / "config.json").is_file() and list((run / "mlx_model").glob("*.safetensors"))
