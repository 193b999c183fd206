"""What a daemon process keeps out of its imports until it needs it: PyTorch and W&B.

Both are pulled in by libraries the daemon uses for something else, whenever they are
installed (and they are on many Macs: the `convert` extra, other projects):
transformers, under mlx-lm's tokenizer, imports all of PyTorch; mlx-lm's tuner imports
wandb for a callback the daemon does not use. Measured on the tiny model's start
(tokenizer and model load): 3.8 s and 337 MB of memory with them, 1.1 s and 93 MB
without, in a process that never runs a torch operation. A 16 GB Mac training overnight
wants the memory back, and every `run`, `status`-free command and test pays the seconds.

The CLI hides them before anything else is imported (`hide`): the libraries then see a
machine without them. The code that really uses one brings it back (`load`): the `.bin`
conversion (modelio/convert.py) for torch, the W&B tracker (runtime/trackers.py) for
wandb. A module that someone else set to None in sys.modules stays hidden.
"""

from __future__ import annotations

import importlib
import sys

HIDDEN = ("torch", "wandb")
_hidden_here: set[str] = set()


def hide(names: tuple[str, ...] = HIDDEN) -> None:
    """Make `import NAME` fail and NAME look absent, for each name not imported already."""
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = None  # importlib's own "not importable" marker
            _hidden_here.add(name)


def load(name: str):
    """Import and return the module `name`, undoing `hide`; raise ImportError when it is
    not installed."""
    if name in _hidden_here and name in sys.modules and sys.modules[name] is None:
        del sys.modules[name]
        _hidden_here.discard(name)
    return importlib.import_module(name)
