"""A tiny random-weight Llama written to a local folder, so the demo and the tests run a real
engine without downloading anything. Prompts are strings like "w5 w17 w9 ..."."""

from __future__ import annotations

import json
from pathlib import Path

VOCAB_SIZE = 1024
_FIRST_WORD = 3  # ids 0..2 are <unk>, <s>, </s>


def make_tiny_llama(out_dir: str | Path, *, max_positions: int = 16384, seed: int = 0) -> Path:
    """Write config, weights and a word-level tokenizer to ``out_dir`` (idempotent)."""
    out = Path(out_dir)
    marker = out / "kvtier-tiny.json"
    settings = {"max_positions": max_positions, "seed": seed, "vocab": VOCAB_SIZE}
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return out
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2,
             **{f"w{i}": i for i in range(_FIRST_WORD, VOCAB_SIZE)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, bos_token_id=1,
                         eos_token_id=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    marker.write_text(json.dumps(settings))
    return out


def random_words(rng, n: int) -> str:
    """``n`` random words of the tiny vocabulary (never the special tokens)."""
    return " ".join(f"w{rng.randint(_FIRST_WORD, VOCAB_SIZE - 1)}" for _ in range(n))
