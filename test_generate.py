"""
Tests of generate.py on tiny random models (teacher from transformers' LlamaConfig, its converted student and a
hybrid) with a tiny byte-level BPE tokenizer built here: greedy decoding against the full-sequence forward,
seeds, top-k/top-p, repetition penalty, chat templates (SPEC §2 literals), streaming of multi-byte text, EOS
lists, the CLI end to end and its one-line errors.  Run: `python -m pytest -q test_generate.py`.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import generate as G
import qrwkv

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
                 "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def make_tokenizer(path, merges=(("Ġ", "t"), ("h", "e"), ("Ġt", "he"))):
    """Byte-level BPE: the 256 byte symbols, a few merges, then the ChatML special tokens. Every non-ASCII
    character is split over several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(os.path.join(path, "tokenizer.json"))
    return tok


def make_teacher(path, vocab_size=264):
    import transformers as tf
    cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         initializer_range=0.3, tie_word_embeddings=True, eos_token_id=0)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).float().save_pretrained(path)
    tok = make_tokenizer(path)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": SMOL_TEMPLATE, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:  # several EOS ids, no sampling params
        json.dump({"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}, f)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    teacher_dir = make_teacher(str(root / "teacher"))
    teacher = qrwkv.load_model(teacher_dir, dtype=torch.float32)
    out = {"teacher": teacher_dir}
    for name, attn in (("converted", ()), ("hybrid", (1,))):
        student = qrwkv.student_from_teacher(teacher, attention_layers=attn)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # at init token shift is a no-op and the gate constant: give them real values
            for n, p in student.named_parameters():
                if any(s in n for s in ("time_maa", "time_decay_w", "gate")):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        out[name] = str(root / name)
        qrwkv.save_model(student, out[name], tokenizer_dir=teacher_dir)
    return out


def load(path):
    model, tok = G.load(path, dtype=torch.float32)
    return model, tok


# ----------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("kind", ["converted", "hybrid", "teacher"])
def test_greedy_equals_full_forward_argmax(dirs, kind):
    model, tok = load(dirs[kind])
    prompt = tok.encode("the cat sat on the mat", add_special_tokens=False).ids
    n = 40  # crosses the kernel's 16-token sub-chunks in the full forward below
    out = list(G.generate_tokens(model, prompt, n, temperature=0.0))
    assert len(out) == n
    with torch.inference_mode():
        logits, _ = model(torch.tensor([prompt + out]))
    for i, t in enumerate(out):
        row = logits[0, len(prompt) - 1 + i]
        # the generated token is the argmax of the one-shot forward (up to fp32 noise between the two paths)
        assert row[t] >= row.max() - 1e-4, (kind, i, t, int(row.argmax()))


def test_state_constant_for_converted_grows_for_teacher(dirs):
    for kind, grows in (("converted", False), ("teacher", True)):
        model, tok = load(dirs[kind])
        sizes = []
        for n in (1, 20):
            stats = {}
            list(G.generate_tokens(model, [5, 6, 7], n, temperature=0.0, stats=stats))
            sizes.append(stats["state_bytes"])
        assert (sizes[1] > sizes[0]) == grows, (kind, sizes)


def test_seed_reproducible(dirs):
    model, tok = load(dirs["converted"])
    prompt = tok.encode("hello", add_special_tokens=False).ids

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return list(G.generate_tokens(model, prompt, 12, temperature=1.0, top_k=0, top_p=1.0, generator=g))
    assert run(3) == run(3)
    assert any(run(s) != run(3) for s in (4, 5, 6))


def test_stop_on_any_eos_id(dirs):
    model, tok = load(dirs["converted"])
    prompt = tok.encode("the the the", add_special_tokens=False).ids
    free = list(G.generate_tokens(model, prompt, 20, temperature=0.0))
    stop = free[5]
    cut = free.index(stop)
    eos = [v for v in (250, 251, 252) if v not in free[:cut]] + [stop]
    out = list(G.generate_tokens(model, prompt, 20, temperature=0.0, eos_ids=eos))
    assert out == free[:cut] and stop not in out
    # the EOS ids of a directory: generation_config list + config.json + eos_token + the template's end of turn
    ids = G.eos_token_ids(dirs["converted"], tok, "smollm2")
    assert set(ids) == {0, tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}


# ----------------------------------------------------------------------------- sampling functions

PROBS = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])


def kept(logits):
    return torch.isfinite(logits).nonzero().flatten().tolist()


def test_filter_logits_top_k_top_p():
    lg = PROBS.log()
    assert kept(G.filter_logits(lg, top_p=0.8)) == [0, 1, 2]
    assert kept(G.filter_logits(lg, top_k=2)) == [0, 1]
    assert kept(G.filter_logits(lg, top_p=0.4)) == [0]
    assert kept(G.filter_logits(lg, top_p=0.97)) == [0, 1, 2, 3, 4]
    assert kept(G.filter_logits(lg, top_k=0, top_p=1.0)) == [0, 1, 2, 3, 4]
    assert kept(G.filter_logits(lg, top_k=4, top_p=0.6)) == [0, 1]
    perm = torch.tensor([3, 0, 4, 2, 1])            # same distribution, shuffled order
    assert sorted(kept(G.filter_logits(lg[perm], top_p=0.8))) == [1, 3, 4]


def test_sample_next_draws_only_kept_tokens():
    lg = PROBS.log()
    g = torch.Generator().manual_seed(0)
    for kw, allowed in ((dict(top_p=0.8), {0, 1, 2}), (dict(top_k=2), {0, 1})):
        draws = [G.sample_next(lg, 1.0, generator=g, **kw) for _ in range(600)]
        assert set(draws) == allowed
    draws = torch.tensor([G.sample_next(lg, 1.0, top_p=0.8, generator=g) for _ in range(2000)])
    freq = torch.bincount(draws, minlength=5).float() / 2000
    assert torch.allclose(freq[:3], PROBS[:3] / 0.85, atol=0.05)
    assert G.sample_next(torch.tensor([0.1, 3.0, 3.0, -1.0]), 0.0) == 1      # greedy, ties to the lowest id


def test_repetition_penalty():
    lg = torch.tensor([2.0, -1.0, 0.5, 4.0])
    out = G.apply_repetition_penalty(lg, [0, 1, 0], 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 4.0]
    assert lg.tolist() == [2.0, -1.0, 0.5, 4.0]                              # input untouched
    assert G.apply_repetition_penalty(lg, [0], 1.0).tolist() == lg.tolist()


# ----------------------------------------------------------------------------- chat templates

MSG = "Hello"
SPEC_TEMPLATES = {  # SPEC §2, with {msg} = MSG
    "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "qwen2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "qwen3": "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "smollm2": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
}


@pytest.mark.parametrize("family", sorted(SPEC_TEMPLATES))
def test_render_chat_spec_strings(family):
    assert G.render_chat(family, MSG) == SPEC_TEMPLATES[family]


def test_render_chat_system_override():
    assert G.render_chat("qwen2.5", MSG, system="Be brief.") == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert G.render_chat("smollm2", MSG, system="") == SPEC_TEMPLATES["qwen3"]
    assert G.render_chat("llama3", MSG, system="Be brief.") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert G.render_chat("raw", MSG) == MSG
    with pytest.raises(ValueError):
        G.render_chat("gpt2", MSG)


@pytest.mark.parametrize("family,files", [
    ("qwen2.5", dict(tokenizer_config={"chat_template": "{%- if messages[0]['role'] == 'system' %}...{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"})),
    ("qwen2", dict(tokenizer_config={"chat_template": "{% if loop.first %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"})),
    ("qwen3", dict(tokenizer_config={"chat_template": "{%- if enable_thinking is defined %}<|im_start|>assistant\\n<think>"})),
    ("qwen3", dict(tokenizer_config={"chat_template": "<|im_start|>"}, config={"model_type": "rwkv6qwen2", "teacher_model_type": "qwen3"})),
    ("smollm2", dict(tokenizer_config={"chat_template": SMOL_TEMPLATE})),
    ("smollm2", dict(tokenizer_config={"added_tokens_decoder": {"1": {"content": "<|im_start|>"}}}, config={"_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"})),
    ("chatml", dict(tokenizer_config={"chat_template": "{{ '<|im_start|>' + message['role'] }}"})),
    ("llama3", dict(tokenizer_config={"added_tokens_decoder": {"128006": {"content": "<|start_header_id|>"}}})),
    ("llama3", dict(jinja="{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}")),
    ("raw", dict(tokenizer_config={})),
])
def test_chat_family(tmp_path, family, files):
    for name in ("tokenizer_config", "config"):
        if name in files:
            (tmp_path / f"{name}.json").write_text(json.dumps(files[name]))
    if "jinja" in files:
        (tmp_path / "chat_template.jinja").write_text(files["jinja"])
    assert G.chat_family(str(tmp_path)) == family


def test_chat_family_of_test_models(dirs):
    assert G.chat_family(dirs["converted"]) == "smollm2"
    assert G.chat_family(dirs["teacher"]) == "smollm2"


# ----------------------------------------------------------------------------- streaming

def test_stream_multibyte_characters(tmp_path):
    tok = make_tokenizer(str(tmp_path))
    text = "the café 日本 says 🙂 hé!"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text)                   # multi-byte characters span several tokens
    s = G.StreamDecoder(tok)
    chunks = [s.push(i) for i in ids] + [s.flush()]
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)
    assert "" in chunks[:-1]                      # something was held back mid-character
    assert "日本" in chunks or any("本" in c for c in chunks)


def test_stream_skips_special_tokens(tmp_path):
    tok = make_tokenizer(str(tmp_path))
    s = G.StreamDecoder(tok)
    ids = tok.encode("hi", add_special_tokens=False).ids + [tok.token_to_id("<|im_start|>")]
    assert "".join(s.push(i) for i in ids) + s.flush() == "hi"


# ----------------------------------------------------------------------------- CLI

def test_cli_end_to_end(dirs):
    model, tok = load(dirs["converted"])
    ids = tok.encode(G.render_chat("smollm2", "héllo"), add_special_tokens=False).ids
    with torch.inference_mode():
        _, state = model(torch.tensor([ids]))
    r = subprocess.run([sys.executable, os.path.join(HERE, "generate.py"), "--model", dirs["converted"], "--prompt", "héllo",
                        "--max_new_tokens", "8", "--num_samples", "2", "--temperature", "0.7"],
                       capture_output=True, text=True, cwd=HERE, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(r"prefill \d+ tokens: [\d.]+ tokens/s \| decode \d+ tokens: ([\d.]+|n/a) tokens/s", r.stderr), r.stderr
    assert f"state {state.nbytes()} bytes" in r.stderr, r.stderr   # constant: the prefill state's size
    assert "chat template smollm2" in r.stderr and r.stdout.count("---------------") == 2


def test_cli_prompt_file_and_no_chat(dirs, tmp_path, capsys):
    p = tmp_path / "prompt.txt"
    p.write_text("the cat")
    G.main(["--model", dirs["hybrid"], "--prompt", f"@{p}", "--no_chat", "--max_new_tokens", "3", "--temperature", "0"])
    err = capsys.readouterr().err
    n = len(G.load_tokenizer(dirs["hybrid"], 10**6).encode("the cat").ids)
    assert "chat template raw" in err and f"prefill {n} tokens" in err, err


def one_line_error(argv, match):
    with pytest.raises(SystemExit) as e:
        G.main(argv)
    msg = str(e.value.code)
    assert "\n" not in msg and re.search(match, msg), msg


def test_cli_errors(dirs, tmp_path, monkeypatch):
    conv = dirs["converted"]
    one_line_error(["--model", str(tmp_path / "nope"), "--prompt", "hi"], "no such directory")
    one_line_error(["--model", str(tmp_path), "--prompt", "hi"], "cannot load.*config.json")
    one_line_error(["--model", conv, "--prompt", "   \n"], "empty prompt")
    one_line_error(["--model", conv, "--prompt", f"@{tmp_path / 'missing.txt'}"], "cannot read the prompt file")
    bad = tmp_path / "badjson"
    shutil.copytree(conv, bad)
    (bad / "config.json").write_text("{not json")
    one_line_error(["--model", str(bad), "--prompt", "hi"], "cannot load")
    notok = tmp_path / "notok"
    shutil.copytree(conv, notok)
    os.remove(notok / "tokenizer.json")
    one_line_error(["--model", str(notok), "--prompt", "hi"], "no tokenizer.json")
    small = make_teacher(str(tmp_path / "small"), vocab_size=200)   # tokenizer has 262 tokens
    one_line_error(["--model", small, "--prompt", "hi"], "262 tokens but the model's vocab_size is 200")
    monkeypatch.chdir(tmp_path)                                     # the default model is missing
    one_line_error(["--prompt", "hi"], "convert.py")
