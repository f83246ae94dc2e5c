"""Create a tiny random-weight Llama model + byte-level BPE tokenizer, fully offline.

Usage: python make_tiny_llama.py OUT_DIR [--vocab 2048] [--hidden 256] [--layers 2]
                                         [--heads 4] [--max-pos 4096] [--dtype bfloat16] [--seed 0]

Run it with the vLLM venv's python (needs torch, tokenizers, transformers):
    .venv-vllm/bin/python scripts/make_tiny_llama.py .cache/models/tiny-llama
    .venv-vllm/bin/python scripts/make_tiny_llama.py .cache/models/small-llama \
        --hidden 1024 --layers 8 --heads 16          # 88M params, for benchmarks

The result can be served with `vllm serve OUT_DIR`. Weights are random (seeded), so the
generated text is gibberish, but tokenization, prefix caching, KV events and the OpenAI
API all behave like with a real model. Deterministic for a given seed and sizes.
"""
import argparse
import json
import os
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "the quick brown fox jumps over lazy dog system user assistant you are a helpful "
    "request cache prefix token block router replica load balance model serve answer "
    "question please explain why how what when where code python rust function class "
    "return value list dict string number time data server client network latency "
    "throughput hello world alpha beta gamma delta epsilon one two three four five six"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus(n_lines: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n_lines):
        k = rng.randint(5, 40)
        line = " ".join(rng.choice(WORDS) for _ in range(k))
        if rng.random() < 0.3:
            line += " " + "".join(rng.choice("0123456789,.;:!?-_()[]{}") for _ in range(8))
        yield line.capitalize() + "."


def build_tokenizer(vocab_size: int, seed: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    tok.train_from_iterator(corpus(20000, seed), trainer=trainer)
    # prepend BOS like Llama tokenizers do
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    # minimal chat template so /v1/chat/completions works
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)  # head_dim = hidden/heads = 64
    ap.add_argument("--max-pos", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    os.makedirs(a.out, exist_ok=True)
    tok = build_tokenizer(a.vocab, a.seed)
    tok.save_pretrained(a.out)

    torch.manual_seed(a.seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=a.hidden,
        intermediate_size=a.hidden * 2,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.heads,
        max_position_embeddings=a.max_pos,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype=a.dtype,
    )
    model = LlamaForCausalLM(cfg).to(getattr(torch, a.dtype))
    model.save_pretrained(a.out, safe_serialization=True)
    # generation_config without sampling defaults that could surprise tests
    with open(os.path.join(a.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id}, f)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {a.out}: vocab={len(tok)} params={n/1e6:.2f}M dtype={a.dtype}")
    print("sample ids:", tok("The quick brown fox")["input_ids"])


if __name__ == "__main__":
    main()
