"""Write a tiny random-weight Llama-style model in HF format: config.json, model.safetensors and a
byte-level BPE tokenizer trained here on a few sentences (no download).

    python make_tiny_llama.py OUT_DIR [--hidden N --ffn N --layers N --heads N --kv-heads N]

Runs with the Python of the vLLM environment (it has torch, transformers and tokenizers).
Shapes: hidden 256, 4 heads (head_dim 64: vLLM's CPU attention rejects head_dim 16 on the first
request while /health already answers 200), 2 layers, vocabulary 512; ~2.7 MB in bf16.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CORPUS = [
    "Hello, how are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "Write a short story about a robot who learns to paint.",
    "Large language models predict the next token from the previous ones.",
    "Once upon a time there was a small server that answered every request.",
    "def add(a, b):\n    return a + b\n",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "One two three four five six seven eight nine ten.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def main(out: Path, hidden: int = 256, ffn: int = 512, layers: int = 2, heads: int = 4, kv_heads: int = 4) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    print(json.dumps({"path": str(out), "files": sorted(p.name for p in out.iterdir())}))


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) % 2 != 1 or any(a not in ("--hidden", "--ffn", "--layers", "--heads", "--kv-heads") for a in args[1::2]):
        sys.exit(__doc__)
    shape = {k.lstrip("-").replace("-", "_"): int(v) for k, v in zip(args[1::2], args[2::2], strict=True)}
    main(Path(args[0]), **shape)
