"""
Shared test fixtures: tiny random teachers (transformers Llama / Qwen2 saved with save_pretrained), a byte-level BPE
tokenizer trained on a small corpus with a learnable structure, and a randomiser for time-mix parameters (whose init
makes token shift a no-op and the gate constant). pytest imports this file before the test files.
"""
import json
import os
import random

import pytest
import torch

WORDS = ("the quick brown fox jumps over a lazy dog while seven red birds sing in old green trees near the "
         "river and one small cat sleeps").split()


def make_corpus(n_docs=160, seed=0):
    """Documents with a learnable structure: each word is followed by one of its two successors."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        w = rng.randrange(len(WORDS))
        out = []
        for _ in range(rng.randint(15, 45)):
            out.append(WORDS[w])
            w = (w + rng.choice((1, 1, 3))) % len(WORDS)
        docs.append(" ".join(out) + ".")
    return docs


def make_teacher(path, docs, kind="llama", seed=0, tie=True):
    """A byte-level BPE tokenizer (320 tokens, <eos> = 0) trained on docs and a tiny random transformers model."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    os.makedirs(path, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(path, "tokenizer.json"))
    torch.manual_seed(seed)
    common = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=0,
                  bos_token_id=0, tie_word_embeddings=tie, initializer_range=0.15)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    model.save_pretrained(path)
    return path


def randomize_time_mix(model, seed=0, scale=0.1, lora_scale=0.3):
    """Give every time-mix parameter real values (token-shift/decay LoRAs at lora_scale, the rest at scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in ("time_maa", "time_decay_w", "gate")):
                s = lora_scale if "time_maa_w2" in n or "decay_w2" in n else scale
                p.copy_(torch.randn(p.shape, generator=g) * s)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A text corpus (jsonl) and two tiny teachers trained on nothing: a tied Llama and an untied Qwen2."""
    root = tmp_path_factory.mktemp("convert")
    docs = make_corpus()
    data = root / "text.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return dict(root=root, docs=docs, data=str(data),
                llama=make_teacher(str(root / "llama"), docs, "llama"),
                qwen=make_teacher(str(root / "qwen"), docs, "qwen2", seed=1, tie=False))
