"""`serve`: the run's base model and adapters behind mlx-lm's OpenAI-compatible server
(its front-end, the options and the banner, is cli/evaluation.py).

mlx-lm's server (`mlx_lm.server`: /v1/chat/completions, /v1/completions, /v1/models)
does the serving; this module hands it the model, the adapters and a chat template that
prompts the way the adapters were trained (adapter_config.json's `prompt_format`):

- "chat": the model's own chat template, with DeepSeek-Math's instruction appended to
  each user message that lacks it, as training did (`template.user_message`), so a
  client sends just the problem and gets what `generate` gives;
- "tutor": the tutor text around the last user message.

The model is loaded through mlx-lm's loader, then `fit_to_device` (float32 scales for a
quantized model on the CPU). Bound to 127.0.0.1 unless --host says otherwise; the address
is tried before anything loads, because mlx-lm's server, once its model thread has
started, hangs instead of exiting when it cannot bind.

`GET /v1/models` lists the one model served (with its adapters and prompt format), not
mlx-lm's scan of the Hugging Face cache (a traceback when that cache does not exist,
offline, and models this server would load without the adapters). A request naming that
model's id gets the model with the adapters, as one naming none does.
"""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path

from mathlora_daemon.errors import InputError
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


def check_address(host: str, port: int) -> None:
    """Given --host and --port, bind a socket there as the server will (SO_REUSEADDR, as
    http.server sets it) and close it; raise InputError naming the option when that
    fails: the port taken or not allowed, the host not an address of this machine."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"--host {host}: not an address of this machine ({exc.strerror}); try 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise InputError(f"--port {port}: address already in use on {host}; choose another --port") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise InputError(f"--port {port}: not allowed ({exc.strerror}; ports below 1024 need root); choose "
                             "another --port") from None
        raise InputError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); choose "
                         "another --host or --port") from None
    finally:
        sock.close()


def models_list(model_id: str, adapter_path: Path | None, template: str, created: int, wanted: str = "") -> dict:
    """Given the served model's id, its adapters, prompt format, the server's start time
    and the id a `GET /v1/models/<id>` asks for (empty: all), return the OpenAI list."""
    entry = {"id": model_id, "object": "model", "created": created, "owned_by": "mathlora-daemon",
             "adapters": str(Path(adapter_path).resolve()) if adapter_path is not None else None,
             "prompt_format": template}
    wanted = wanted.strip("/")  # an absolute path as id: /v1/models//tmp/run/mlx_model
    return {"object": "list", "data": [entry] if wanted in ("", model_id.strip("/"), "default_model") else []}


def check_serving(model_dir: Path, adapter_path: Path | None, host: str, port: int) -> None:
    """Given the model, optional adapters, --host and --port, raise InputError when the
    files cannot be served or the address cannot be listened on; nothing is loaded (see
    the module docstring: the address is tried before the model loads)."""
    from mathlora_daemon.modelio.loading import check_adapter_dir, check_model_dir

    check_model_dir(Path(model_dir))
    if adapter_path is not None:
        check_adapter_dir(Path(adapter_path))
    check_address(host, port)


def serve_model(model_dir: Path, adapter_path: Path | None, template: str, host: str, port: int,
                max_tokens: int, log_level: str = "INFO") -> None:
    """Given the model, optional adapters and the prompt format (checked by
    `check_serving`), run mlx-lm's server in this process until interrupted."""
    import sys

    import mlx_lm.server as server
    from mlx_lm.utils import load_tokenizer

    from mathlora_daemon.modelio.loading import fit_to_device

    tokenizer = load_tokenizer(Path(model_dir))
    own = getattr(tokenizer, "chat_template", None)
    ids = tokenizer.encode("x")
    bos = tokenizer.bos_token if tokenizer.bos_token and ids and ids[0] == tokenizer.bos_token_id else ""
    chat_template = chat_template_for(template, own if isinstance(own, str) else None, bos)

    model_id = str(Path(model_dir).resolve())

    class Provider(server.ModelProvider):
        def __init__(self, cli_args):
            super().__init__(cli_args)
            # The id /v1/models lists is the default model, adapters included.
            self._model_map[model_id] = self._model_map["default_model"]
            self._adapter_map[model_id] = self._adapter_map["default_model"]

        def _load(self, *args, **kwargs):
            super()._load(*args, **kwargs)
            fit_to_device(self.model)

    def handle_models_request(handler) -> None:
        wanted = handler.path.split("?", 1)[0][len("/v1/models"):].strip("/")
        body = json.dumps(models_list(model_id, adapter_path, template, handler.created, wanted)).encode()
        handler._set_completion_headers(200)
        handler.end_headers()
        handler.wfile.write(body)
        handler.wfile.flush()

    argv = ["mathlora-daemon serve", "--model", str(model_dir), "--host", host, "--port", str(port),
            "--chat-template", chat_template, "--max-tokens", str(max_tokens), "--log-level", log_level]
    if adapter_path is not None:
        argv += ["--adapter-path", str(adapter_path)]
    saved = sys.argv, server.ModelProvider, server.APIHandler.handle_models_request
    sys.argv, server.ModelProvider = argv, Provider
    server.APIHandler.handle_models_request = handle_models_request
    try:
        server.main()
    except KeyboardInterrupt:
        pass
    finally:
        sys.argv, server.ModelProvider, server.APIHandler.handle_models_request = saved
