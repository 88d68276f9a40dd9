"""
Tests of generate.py on tiny random models (teacher from transformers' LlamaConfig, its converted student and a
hybrid) with a tiny byte-level BPE tokenizer built here: greedy decoding against the full-sequence forward,
seeds, top-k/top-p, repetition penalty, chat templates (SPEC §2 literals), streaming of multi-byte text, EOS
lists, the CLI end to end and its one-line errors.  Run: `python -m pytest -q test_generate.py`.
"""
import io
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime

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
    # the EOS ids of a directory: generation_config list + config.json + tokenizer_config.json's eos_token
    ids = G.eos_token_ids(dirs["converted"], tok)
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

TEMPLATES = os.path.join(HERE, "testdata", "chat_templates")
FAMILIES = {  # family: (template text, the special tokens its tokenizer_config.json names)
    "smollm2": (SMOL_TEMPLATE, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                                "unk_token": "<|endoftext|>"}),
    "qwen2.5": ("qwen2.5.jinja", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "qwen3": ("qwen3.jinja", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "llama3": ("llama3.2.jinja", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a <b>colour</b> & 🙂"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
     {"role": "user", "content": "and 3+3?"}],
]


def template_dir(root, family, jinja_file=False):
    """A tokenizer directory with the family's template (in tokenizer_config.json, or chat_template.jinja)."""
    template, tokens = FAMILIES[family]
    if template.endswith(".jinja"):
        with open(os.path.join(TEMPLATES, template), encoding="utf-8") as f:
            template = f.read()
    d = os.path.join(root, family + ("-jinja" if jinja_file else ""))
    os.makedirs(d, exist_ok=True)
    make_tokenizer(d)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens}
    if jinja_file:
        with open(os.path.join(d, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template)
        cfg["chat_template"] = "{{ raise_exception('the .jinja file takes priority') }}"
    else:
        cfg["chat_template"] = template
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return d


def render_both(d, messages, **kw):
    """(ours, transformers') rendering of messages with add_generation_prompt=True."""
    import transformers
    ref = transformers.AutoTokenizer.from_pretrained(d).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kw)
    ours = G.render_chat(G.read_chat_template(d), messages, **G.special_tokens(d), **kw)
    return ours, ref


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("jinja_file", [False, True], ids=["tokenizer_config", "chat_template.jinja"])
def test_render_chat_equals_transformers(tmp_path, family, jinja_file):
    d = template_dir(str(tmp_path), family, jinja_file)
    for messages in CONVERSATIONS:
        ours, ref = render_both(d, messages)
        if ours != ref:  # Llama 3.2 writes today's date (strftime_now): a render across midnight differs once
            ours, ref = render_both(d, messages)
        assert ours == ref, (family, messages)
    if family == "llama3":
        assert f"Today Date: {datetime.now():%d %b %Y}" in ours        # strftime_now ran
    for thinking in (False, True):  # Qwen3's switch; other templates ignore the variable
        ours, ref = render_both(d, CONVERSATIONS[2], enable_thinking=thinking)
        assert ours == ref, (family, thinking)
        if family == "qwen3":
            assert ours.endswith("<|im_start|>assistant\n" + ("" if thinking else "<think>\n\n</think>\n\n"))


def test_render_chat_sandbox_helpers(tmp_path):
    """tojson without HTML escaping and with its options, raise_exception, {% generation %} blocks, loop controls."""
    template = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m | tojson(indent=1) }}"
                "{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
                "{% if not add_generation_prompt %}{{ raise_exception('needs a generation prompt') }}{% endif %}")
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "<é & \"q\">"}]
    d = str(tmp_path)
    make_tokenizer(d)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template}, f)
    ours, ref = render_both(d, messages)
    assert ours == ref and '"<é & \\"q\\">"' in ours and "\n " in ours
    with pytest.raises(G.GenerateError, match="^the chat template failed: TemplateError: needs a generation prompt$"):
        G.render_chat(template, messages, add_generation_prompt=False)
    with pytest.raises(G.GenerateError, match="TemplateSyntaxError"):
        G.render_chat("{% for m in messages %}", messages)


def test_read_chat_template_sources(tmp_path):
    assert G.read_chat_template(str(tmp_path)) is None                                    # no files
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
         "eos_token": {"content": "<|im_end|>", "special": True}}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "X", "bos_token": "<s>"}))
    assert G.read_chat_template(str(tmp_path)) == "D"                                     # the named default
    assert G.special_tokens(str(tmp_path)) == {"eos_token": "<|im_end|>", "bos_token": "<s>"}
    (tmp_path / "chat_template.jinja").write_text("J")
    assert G.read_chat_template(str(tmp_path)) == "J"                                     # the file wins


@pytest.mark.teacher
def test_template_of_the_demo_teacher():
    import prepare
    d = str(prepare.prepare(os.path.join(HERE, "data"), quiet=True)[0])
    assert "SmolLM" in G.read_chat_template(d)
    for messages in CONVERSATIONS:
        ours, ref = render_both(d, messages)
        assert ours == ref


# ----------------------------------------------------------------------------- chat mode

SCRIPT = "hello there\nthe cat sat\n\nwhat now?\n"     # 3 turns and a blank line


def letters_only(model, tok):
    """The same model with an LM head that only ever picks a-z or space (the other rows zeroed, these scaled up),
    so every reply re-tokenizes to the ids generated (with a merge-free tokenizer) and chat can stay incremental."""
    allowed = [tok.token_to_id(c) for c in "abcdefghijklmnopqrstuvwxyzĠ"]
    head = torch.zeros_like(model.lm_head.weight)
    head[allowed] = model.lm_head.weight[allowed] * 10
    model.lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False)
    model.lm_head.weight.data.copy_(head)
    return model


LAST_ONLY = ("{% for m in messages[-1:] %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")   # rewrites the history every turn


def run_chat(model, tok, eos, template=SMOL_TEMPLATE, script=SCRIPT):
    err = io.StringIO()
    turns = G.chat(model, tok, template, io.StringIO(script), out=io.StringIO(), err=err, max_new_tokens=12,
                   eos_ids=eos, temperature=0.0)
    return turns, err.getvalue()


@pytest.mark.parametrize("kind", ["converted", "teacher"])
@pytest.mark.parametrize("mode", ["canonical", "own-tokens", "rewritten"])
def test_chat_equals_prefilling_at_once(dirs, tmp_path, kind, mode):
    """Each turn's greedy reply equals decoding after prefilling, at once, what the state was carried to: the whole
    rendered conversation when the replies re-tokenize to their own ids ("canonical") or the template rewrites the
    history (then re-prefilled); the model's own reply ids followed by the rest of the text otherwise."""
    d = tmp_path / kind
    shutil.copytree(dirs[kind], d)
    tok = make_tokenizer(str(d), merges=()) if mode == "canonical" else G.load_tokenizer(str(d), 10**6)
    model = qrwkv.load_model(str(d), dtype=torch.float32)
    if mode == "canonical":                          # bytes only, and letters only: replies re-tokenize to themselves
        model = letters_only(model, tok)
    eos = G.eos_token_ids(str(d), tok)
    template = LAST_ONLY if mode == "rewritten" else SMOL_TEMPLATE
    turns, log = run_chat(model, tok, eos, template)
    assert [t[0] for t in turns] == ["hello there", "the cat sat", "what now?"]
    messages, seen, states = [], [], []
    for i, (user, reply, prompt) in enumerate(turns):
        messages.append({"role": "user", "content": user})
        text = G.render_chat(template, messages)
        ids = tok.encode(text, add_special_tokens=False).ids
        assert list(G.generate_tokens(model, prompt, 12, temperature=0.0, eos_ids=eos)) == reply, i
        m = re.search(rf"\[turn {i + 1}: prefill (\d+) new tokens: .* \| state (\d+) bytes at (\d+) tokens\]", log)
        prefilled, states = int(m[1]), states + [int(m[2])]
        if mode == "rewritten":
            assert prompt == ids and prefilled == len(ids)                         # all again, every turn
        else:
            assert prompt[:len(seen)] == seen and prefilled == len(prompt) - len(seen)   # the carried state + new
            assert (prompt == ids) == (mode == "canonical") or i == 0, i
            assert tok.decode(prompt, skip_special_tokens=False) == text          # the fed ids spell the conversation
        seen = prompt + (reply[:11] if len(reply) == 12 else reply)                # a 12th is fed next turn
        assert int(m[3]) == len(seen)
        messages.append({"role": "assistant", "content": tok.decode(reply)})
    assert log.count("rewrote the history") == (2 if mode == "rewritten" else 0), log
    assert all(len(t[1]) > 3 for t in turns)
    if mode != "rewritten":  # a time-mix state has one size whatever the conversation's length; a KV cache grows
        assert (states[0] == states[1] == states[2]) == (kind == "converted"), states


def test_cli_chat_reset_and_eof(dirs):
    r = subprocess.run([sys.executable, os.path.join(HERE, "generate.py"), "--model", dirs["converted"], "--chat",
                        "--max_new_tokens", "6", "--temperature", "0", "--system", "Be brief."],
                       input="hi\nthe cat\n/reset\nhi\n", capture_output=True, text=True, cwd=HERE, timeout=120)
    assert r.returncode == 0, r.stderr
    replies = r.stdout.split("\n")
    assert len(replies) == 4 and replies[0] == replies[2], replies          # after /reset: the first turn again
    costs = re.findall(r"\[turn (\d): prefill (\d+) new tokens", r.stderr)
    assert [c[0] for c in costs] == ["1", "2", "1"] and costs[0][1] == costs[2][1], r.stderr
    assert "[reset: new conversation]" in r.stderr and "Traceback" not in r.stderr


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
    model, tok = G.load(dirs["converted"], dtype=qrwkv.auto_dtype("cpu")[0])   # the dtype generate.py --dtype auto picks
    text = G.render_chat(SMOL_TEMPLATE, [{"role": "user", "content": "héllo"}])
    with torch.inference_mode():
        _, state = model(torch.tensor([tok.encode(text, add_special_tokens=False).ids]))
    r = subprocess.run([sys.executable, os.path.join(HERE, "generate.py"), "--model", dirs["converted"], "--prompt", "héllo",
                        "--max_new_tokens", "8", "--num_samples", "2", "--temperature", "0.7"],
                       capture_output=True, text=True, cwd=HERE, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(r"prefill \d+ tokens: [\d.]+ tokens/s \| decode \d+ tokens: ([\d.]+|n/a) tokens/s", r.stderr), r.stderr
    assert f"state {state.nbytes()} bytes" in r.stderr, r.stderr   # constant: the prefill state's size
    assert f"chat template of {dirs['converted']}" in r.stderr and r.stdout.count("---------------") == 2
    want = "float32 (CPU without native bf16" if not qrwkv.cpu_has_native_bf16() else "bfloat16 (CPU with native bf16"
    assert f"dtype {want}" in r.stderr, r.stderr                   # --dtype auto says what it chose and why


def test_cli_prompt_file_and_no_chat(dirs, tmp_path, capsys):
    p = tmp_path / "prompt.txt"
    p.write_text("the cat")
    G.main(["--model", dirs["hybrid"], "--prompt", f"@{p}", "--no_chat", "--max_new_tokens", "3", "--temperature", "0"])
    err = capsys.readouterr().err
    n = len(G.load_tokenizer(dirs["hybrid"], 10**6).encode("the cat").ids)
    assert "chat template none" in err and f"prefill {n} tokens" in err and "no chat template" not in err, err
    notemplate = tmp_path / "notemplate"
    shutil.copytree(dirs["hybrid"], notemplate)
    os.remove(notemplate / "tokenizer_config.json")
    G.main(["--model", str(notemplate), "--prompt", "the cat", "--max_new_tokens", "3", "--dtype", "float32"])
    err = capsys.readouterr().err
    assert f"[{notemplate} has no chat template: the prompt is completed as plain text]" in err
    assert f"prefill {n} tokens" in err and "dtype float32 (--dtype)" in err, err


def one_line_error(argv, match):
    with pytest.raises(SystemExit) as e:
        G.main(argv)
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("generate.py: error: ") and re.search(match, msg), msg


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
    raises = tmp_path / "raises"
    shutil.copytree(conv, raises)
    (raises / "chat_template.jinja").write_text("{{ raise_exception('only system and user roles, ' + messages[0].role) }}")
    one_line_error(["--model", str(raises), "--prompt", "hi"], "^generate.py: error: the chat template failed: "
                   "TemplateError: only system and user roles, user$")
    one_line_error(["--model", str(notok.parent / "nope2"), "--chat"], "no such directory")
    notemplate = tmp_path / "notemplate"
    shutil.copytree(conv, notemplate)
    os.remove(notemplate / "tokenizer_config.json")
    one_line_error(["--model", str(notemplate), "--chat"], "--chat needs a chat template")
    monkeypatch.chdir(tmp_path)                                     # the default model is missing
    one_line_error(["--prompt", "hi"], "convert.py")
