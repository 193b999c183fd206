"""`serve`'s chat template: the server renders a bare problem exactly as training
prompted it (chat: the model's template with the instruction added; tutor: the text)."""

from mathlora_daemon.evaluation.serve import chat_template_for
from mathlora_daemon.training.template import INSTRUCTION, PromptFormat


def test_the_served_prompt_is_the_training_prompt(tiny_tokenizer):
    hf = tiny_tokenizer._tokenizer
    problem = "What is 7 times 8?"
    chat = chat_template_for("chat", tiny_tokenizer.chat_template)
    for content in (problem, f"{problem}\n{INSTRUCTION}", f"  {problem}  "):
        served = hf.apply_chat_template([{"role": "user", "content": content}], chat_template=chat,
                                        add_generation_prompt=True, tokenize=False)
        assert served == PromptFormat.of("chat", tiny_tokenizer).prompt_text(problem)  # instruction once
    tutor = chat_template_for("tutor", None)
    served = hf.apply_chat_template([{"role": "user", "content": problem}], chat_template=tutor,
                                    add_generation_prompt=True, tokenize=False)
    assert served == PromptFormat.of("tutor", tiny_tokenizer).prompt_text(problem)


def test_a_port_in_use_is_refused_naming_the_option():
    import socket

    import pytest

    from mathlora_daemon.errors import InputError
    from mathlora_daemon.evaluation.serve import check_address

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(InputError, match=rf"--port {port}: address already in use.*choose another --port"):
            check_address("127.0.0.1", port)
    finally:
        taken.close()
    check_address("127.0.0.1", port)  # free again: no error


def test_models_lists_the_served_model_only(tmp_path):
    from mathlora_daemon.evaluation.serve import models_list

    listed = models_list("/runs/a/mlx_model", tmp_path, "chat", 7)
    assert listed == {"object": "list", "data": [{"id": "/runs/a/mlx_model", "object": "model", "created": 7,
                                                  "owned_by": "mathlora-daemon", "adapters": str(tmp_path.resolve()),
                                                  "prompt_format": "chat"}]}
    assert models_list("/runs/a/mlx_model", None, "tutor", 7, "/runs/a/mlx_model")["data"][0]["adapters"] is None
    assert models_list("/runs/a/mlx_model", None, "chat", 7, "other")["data"] == []
