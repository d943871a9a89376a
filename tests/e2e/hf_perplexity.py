"""Reference perplexity with Hugging Face transformers, independent of any server.

    python hf_perplexity.py MODEL_DIR CHUNKS.json

CHUNKS.json: a list of token-id lists. Scores positions len/2+1 .. len-1 of each chunk (as
llama-perplexity does) from one forward pass per chunk, in the model's own dtype, and prints
{"perplexity": ..., "tokens": ...}. Runs with the Python of the vLLM environment (torch, transformers).
"""

from __future__ import annotations

import json
import math
import sys


def main(model_dir: str, chunks_file: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype="auto")
    model.eval()
    chunks = json.loads(open(chunks_file).read())
    nll, n = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            ids = torch.tensor([chunk])
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            for pos in range(len(chunk) // 2 + 1, len(chunk)):
                nll -= float(logprobs[pos - 1, chunk[pos]])
                n += 1
    print(json.dumps({"perplexity": math.exp(nll / n), "tokens": n}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
