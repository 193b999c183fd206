"""`serve`: the run's base model and adapters behind mlx-lm's OpenAI-compatible server.

mlx-lm's server (`mlx_lm.server`: /v1/chat/completions, /v1/completions, /v1/models)
does the serving; this module hands it the model, the adapters and a chat template that
prompts the way the adapters were trained (adapter_config.json's `prompt_format`):

- "chat": the model's own chat template, with DeepSeek-Math's instruction appended to
  each user message that lacks it, as training did (`template.user_message`), so a
  client sends just the problem and gets what `generate` gives;
- "tutor": the tutor text around the last user message.

The model is loaded through mlx-lm's loader, then `fit_to_device` (float32 scales for a
quantized model on the CPU). Bound to 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

from mathlora_daemon.training.template import INSTRUCTION, PROMPT_TEMPLATE


def chat_template_for(template: str, model_chat_template: str | None, bos: str = "") -> str:
    """Given the recorded prompt format ("chat" or "tutor"), the model's own chat
    template and, for tutor, the BOS text the tokenizer puts first (as `generate`'s
    encode does), return the Jinja chat template the server should apply."""
    if template == "tutor":
        head, _, tail = PROMPT_TEMPLATE.partition("{problem}")
        head = bos + head
        # Jinja string literals, escaped as JSON strings are (a subset Jinja reads).
        return ("{%- set ns = namespace(last='') -%}"
                "{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
                "{%- set ns.last = message['content'] -%}{%- endif -%}{%- endfor -%}"
                f"{{{{ {json.dumps(head)} }}}}{{{{ ns.last | trim }}}}{{{{ {json.dumps(tail)} }}}}")
    if not model_chat_template:
        raise ValueError("a chat-format adapter needs the model's chat template")
    suffix = json.dumps("\n" + INSTRUCTION)
    instruction = json.dumps(INSTRUCTION)
    # A top-level `set` shadows the request's `messages` for the rest of the template.
    return ("{%- set ns = namespace(messages=[]) -%}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' and message['content'] is string "
            f"and {instruction} not in message['content'] -%}}"
            "{%- set ns.messages = ns.messages + [{'role': 'user', 'content': (message['content'] | trim) + "
            f"{suffix}}}] -%}}"
            "{%- else -%}{%- set ns.messages = ns.messages + [message] -%}{%- endif -%}"
            "{%- endfor -%}"
            "{%- set messages = ns.messages -%}"
            + model_chat_template)


def serve_main(model_dir: Path, adapter_path: Path | None, template: str, host: str, port: int,
               max_tokens: int, log_level: str = "INFO") -> int:
    """Given the model, optional adapters and the prompt format, run mlx-lm's server in
    this process until interrupted; return 0."""
    import sys

    import mlx_lm.server as server

    from mathlora_daemon.modelio.loading import check_adapter_dir, check_model_dir, fit_to_device

    check_model_dir(Path(model_dir))
    if adapter_path is not None:
        check_adapter_dir(Path(adapter_path))
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(Path(model_dir))
    own = getattr(tokenizer, "chat_template", None)
    ids = tokenizer.encode("x")
    bos = tokenizer.bos_token if tokenizer.bos_token and ids and ids[0] == tokenizer.bos_token_id else ""
    chat_template = chat_template_for(template, own if isinstance(own, str) else None, bos)

    class Provider(server.ModelProvider):
        def _load(self, *args, **kwargs):
            super()._load(*args, **kwargs)
            fit_to_device(self.model)

    argv = ["mathlora-daemon serve", "--model", str(model_dir), "--host", host, "--port", str(port),
            "--chat-template", chat_template, "--max-tokens", str(max_tokens), "--log-level", log_level]
    if adapter_path is not None:
        argv += ["--adapter-path", str(adapter_path)]
    saved_argv, saved_provider = sys.argv, server.ModelProvider
    sys.argv, server.ModelProvider = argv, Provider
    try:
        server.main()
    except KeyboardInterrupt:
        pass
    finally:
        sys.argv, server.ModelProvider = saved_argv, saved_provider
    return 0
