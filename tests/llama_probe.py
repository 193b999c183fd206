"""Run by tests/e2e/test_llama_cpp.py in its own process, with llama-cpp-python on
PYTHONPATH: load a GGUF model (and a LoRA adapter GGUF) in the real llama.cpp, evaluate
the prompt's token ids, greedy-decode a few tokens, and write the prompt's logits (.npy)
and a JSON line {"greedy": [...], "tokenized": [...]} to stdout.

    python llama_probe.py MODEL.gguf (LORA.gguf|-) IDS_JSON TEXT OUT.npy N_GREEDY
"""

import json
import sys

import numpy as np
from llama_cpp import Llama


def main(model: str, lora: str, ids_json: str, text: str, out: str, n_greedy: str) -> None:
    ids = json.loads(ids_json)
    llm = Llama(model_path=model, lora_path=None if lora == "-" else lora, logits_all=True, n_ctx=512,
                n_threads=2, n_threads_batch=2, verbose=False, seed=0)
    tokenized = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    llm.eval(ids)
    logits = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    greedy, nxt = [], int(logits[-1].argmax())
    for _ in range(int(n_greedy)):
        greedy.append(nxt)
        llm.eval([nxt])
        nxt = int(np.asarray(llm.scores[llm.n_tokens - 1]).argmax())
    np.save(out, logits)
    print(json.dumps({"greedy": greedy, "tokenized": tokenized}))


if __name__ == "__main__":
    main(*sys.argv[1:7])
