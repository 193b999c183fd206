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
