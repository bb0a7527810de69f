"""A tiny random-weight Llama written to a local folder, so the demo and the tests run a real
engine without downloading anything. Prompts are strings like "w5 w17 w9 ...".

The model is small but must *see* its KV: the end-to-end checks compare per-token logprobs of
runs with and without kvtier, and a check that one wrong block cannot move proves nothing. With
the default init (std 0.02) attention is nearly uniform and a 2-layer model's outputs barely
depend on any one block of an 8k prefix; a wider init (std 0.1) makes attention peaked enough
that one zeroed, swapped or shifted block moves the logprobs far past the float32 noise of
prefilling on top of loaded KV (measured in ``kvtier.cli.oracle``). It is saved in float32: the
checks run in float32, where that noise is ~1e-5 instead of bf16's diverging tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB_SIZE = 1024
_FIRST_WORD = 3  # ids 0..2 are <unk>, <s>, </s>


# Geometry of the test model: 4 KV heads of 32 (head_size 32 suits the CPU attention backend).
TINY_LLAMA = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 4, "initializer_range": 0.1}


def make_tiny_llama(out_dir: str | Path, *, max_positions: int = 16384, seed: int = 0) -> Path:
    """Write config, float32 weights and a word-level tokenizer to ``out_dir`` (idempotent)."""
    out = Path(out_dir)
    marker = out / "kvtier-tiny.json"
    settings = {"max_positions": max_positions, "seed": seed, "vocab": VOCAB_SIZE,
                **TINY_LLAMA}
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
    config = LlamaConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=max_positions,
                         bos_token_id=1, eos_token_id=2, torch_dtype="float32", **TINY_LLAMA)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(out)
    marker.write_text(json.dumps(settings))
    return out


def random_words(rng, n: int) -> str:
    """``n`` random words of the tiny vocabulary (never the special tokens)."""
    return " ".join(f"w{rng.randint(_FIRST_WORD, VOCAB_SIZE - 1)}" for _ in range(n))
