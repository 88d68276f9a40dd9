"""
Tests of the model (qrwkv.py): teacher logits against Hugging Face transformers (a test oracle only), the
RWKV-6 time-mix against an independent fp64 per-token implementation of SPEC §3, the recurrent path against
the full-sequence forward, and save/load. Run: `python -m pytest -q test_qrwkv.py`.
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import qrwkv

VOCAB, C, H, HK, L = 128, 64, 4, 2, 3
TINY = dict(vocab_size=VOCAB, hidden_size=C, intermediate_size=96, num_hidden_layers=L, num_attention_heads=H,
            num_key_value_heads=HK, max_position_embeddings=256, initializer_range=0.1)


def hf_teacher(tmp_path, family):
    """A tiny random transformers model of `family`, saved with save_pretrained; returns (hf_model, dir)."""
    import transformers as tf
    if family == "qwen2":      # untied, q/k/v biases
        cfg = tf.Qwen2Config(**TINY, tie_word_embeddings=False, rope_theta=1e6)
    elif family == "qwen3":    # explicit head_dim != C/H, q/k norms
        cfg = tf.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False)
    elif family == "llama":    # tied, llama3 rope scaling, attention biases
        cfg = tf.LlamaConfig(**TINY, tie_word_embeddings=True, attention_bias=True, rope_theta=5e5,
                             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=32))
    else:                      # mistral, saved sharded
        cfg = tf.MistralConfig(**TINY, sliding_window=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mis-loaded one shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
    path = str(tmp_path / family)
    model.save_pretrained(path, max_shard_size="200KB" if family == "mistral" else "5GB")
    return model, path


def randomize_time_mix(model, seed=0):
    """Init leaves token shift a no-op and the gate constant; give every time-mix parameter real values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in ("time_maa", "time_decay_w", "gate")):
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "time_maa_w2" in n or "decay_w2" in n else 0.1))


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "mistral"])
def test_teacher_logits_match_transformers(tmp_path, family):
    hf, path = hf_teacher(tmp_path, family)
    if family == "mistral":
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    model = qrwkv.load_model(path, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(ids).logits
        logits, state = model(ids)
        assert max_diff(logits, ref) <= 1e-4
        # KV cache: prefix, then one token at a time, equals the full forward
        out, st = model(ids[:, :25])
        steps = [out]
        for t in range(25, 40):
            o, st = model(ids[:, t:t + 1], st)
            steps.append(o)
        assert max_diff(torch.cat(steps, 1), ref) <= 1e-4
        assert st.pos == 40 and st.layers[0][0].shape == (2, HK, 40, model.config.head_dim)


def test_config_refuses_what_it_does_not_support(tmp_path):
    base = dict(TINY, model_type="llama")
    cases = [(dict(model_type="gpt2"), "model_type"),
             (dict(rope_scaling=dict(rope_type="yarn", factor=2.0)), "rope_type"),
             (dict(model_type="qwen2", use_sliding_window=True, sliding_window=64), "sliding"),
             (dict(model_type="mistral", sliding_window=4096), "sliding_window")]
    for extra, word in cases:
        with pytest.raises(ValueError, match=word):
            qrwkv.Config.from_dict(dict(base, **extra))
    with pytest.raises(FileNotFoundError, match="config.json"):
        qrwkv.load_model(str(tmp_path))
    # transformers v5 style: rope_parameters and dtype
    cfg = qrwkv.Config.from_dict(dict(base, rope_parameters=dict(rope_type="default", rope_theta=1234.0), dtype="bfloat16"))
    assert cfg.rope_theta == 1234.0 and cfg.dtype == "bfloat16" and cfg.head_dim == C // H


def test_student_init_keeps_hidden_states_near_the_teacher(tmp_path):
    """SPEC §3: with N^-1/2 scaling and state balancing the fresh student's per-layer hidden norms stay near the teacher's."""
    _, path = hf_teacher(tmp_path, "qwen2")
    teacher = qrwkv.load_model(path)
    torch.manual_seed(0)
    student = qrwkv.student_from_teacher(teacher)
    ids = torch.randint(0, VOCAB, (2, 200), generator=torch.Generator().manual_seed(2))
    norms = {}
    for name, m in (("t", teacher), ("s", student)):
        hooks = [b.register_forward_hook(lambda mod, i, o, k=(name, j): norms.__setitem__(k, o[0].norm(dim=-1).mean().item()))
                 for j, b in enumerate(m.model.layers)]
        with torch.no_grad():
            m(ids)
        for h in hooks:
            h.remove()
    for j in range(L):
        assert 0.5 < norms["s", j] / norms["t", j] < 2.0, (j, norms)
    # the student shares no storage with the teacher and is trainable
    assert all(s.data_ptr() != t.data_ptr() for s, t in zip(student.parameters(), teacher.parameters()))
    assert all(isinstance(b.self_attn, qrwkv.TimeMix) for b in student.model.layers)


@pytest.mark.parametrize("family,attention_layers,options", [
    ("qwen3", (), {}), ("llama", (1,), {}), ("qwen2", (0, 2), {}),
    ("llama", (), dict(balance_state=False, use_tokenshift=False, use_rope=True, groupnorm_att=True))])
def test_recurrent_state_equals_full_sequence(tmp_path, family, attention_layers, options):
    _, path = hf_teacher(tmp_path, family)
    student = qrwkv.student_from_teacher(qrwkv.load_model(path), attention_layers=attention_layers, **options)
    randomize_time_mix(student)
    ids = torch.randint(0, VOCAB, (2, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = student(ids)
        pieces, st = [], None
        for a, b in ((0, 1), (1, 17), (17, 50), (50, 70)):   # arbitrary pieces
            o, st = student(ids[:, a:b], st)
            pieces.append(o)
        assert max_diff(torch.cat(pieces, 1), full) <= 1e-4
        o, st = student(ids[:, :30])
        steps = [o]
        for t in range(30, 70):                               # token-by-token decoding
            o, st = student(ids[:, t:t + 1], st)
            steps.append(o)
        assert max_diff(torch.cat(steps, 1), full) <= 1e-4
        # the state is what decoding carries: shift (B,1,C) and kv (B,H,N,N) per time-mix layer
        for i, entry in enumerate(st.layers):
            if i not in attention_layers:
                assert entry[0].shape == (2, 1, C) and entry[1].shape == (2, H, student.config.head_dim, student.config.head_dim)


def test_decay_stays_fp32_under_bf16_autocast(monkeypatch):
    """Under bf16 autocast the projections run in bf16 but the decay exponent does not: with the decay LoRA at
    zero, log_w = max(-exp(time_decay), -5) is bit-identical to the fp32 run's (time_decay not rounded to bf16)."""
    cfg = qrwkv.Config.from_dict(dict(model_type="llama", vocab_size=VOCAB, hidden_size=C, intermediate_size=96,
                                      num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=HK))
    torch.manual_seed(0)
    tm = qrwkv.TimeMix(cfg, 1)
    with torch.no_grad():
        tm.time_decay.add_(0.01 * torch.randn_like(tm.time_decay))  # values bf16 cannot hold exactly
        tm.time_decay_w2.zero_()
    seen, real = [], qrwkv.wkv6
    monkeypatch.setattr(qrwkv, "wkv6", lambda r, k, v, log_w, **kw: (seen.append(log_w), real(r, k, v, log_w, **kw))[1])
    x = torch.randn(2, 5, C)
    with torch.no_grad():
        tm(x, None, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tm(x, None, None)
    expected = (-tm.time_decay.detach().exp()).clamp(min=-5.0).view(1, 1, H, -1).expand(2, 5, H, -1)
    assert seen[1].dtype == torch.float32 and torch.equal(seen[0], expected) and torch.equal(seen[1], expected)


def test_save_and_load_converted_model(tmp_path):
    _, path = hf_teacher(tmp_path, "llama")           # tied head stays tied through save/load
    student = qrwkv.student_from_teacher(qrwkv.load_model(path), attention_layers=(2,))
    randomize_time_mix(student)
    (tmp_path / "llama" / "tokenizer.json").write_text("{}")
    out = str(tmp_path / "converted")
    qrwkv.save_model(student, out, tokenizer_dir=path, max_shard_bytes=100_000)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "rwkv6qwen2" and cfg["architectures"] == ["RWKV6Qwen2ForCausalLM"]
    assert cfg["lora_rank_tokenshift"] == 32 and cfg["lora_rank_decay"] == 64 and cfg["attention_layers"] == [2]
    assert cfg["teacher_model_type"] == "llama" and cfg["rope_scaling"]["rope_type"] == "llama3"
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json")) and os.path.isfile(os.path.join(out, "tokenizer.json"))
    loaded = qrwkv.load_model(out)
    ids = torch.randint(0, VOCAB, (1, 33))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], student(ids)[0])
    # saving again over it replaces it whole
    student.untie_lm_head()
    qrwkv.save_model(student, out, tokenizer_dir=path)
    assert not os.path.exists(out + ".tmp") and json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is False
    with torch.no_grad():
        assert torch.equal(qrwkv.load_model(out)(ids)[0], student(ids)[0])


# ----------------------------------------------------------------------------- released rwkv6qwen2 layout

def released_checkpoint(tmp_path, R=8, Rd=8, N=16):
    """A directory as the released QRWKV6 checkpoints are laid out (Qwen2 teacher, no project extensions)."""
    cfg = dict(architectures=["RWKV6Qwen2ForCausalLM"], model_type="rwkv6qwen2", hidden_size=C, intermediate_size=96,
               num_attention_heads=H, num_key_value_heads=HK, num_hidden_layers=2, vocab_size=VOCAB, rms_norm_eps=1e-6,
               rope_theta=1e6, tie_word_embeddings=False, attention_bias=True, attention_output_bias=False,
               gate_rank_type=1, lora_rank_tokenshift=R, lora_rank_decay=Rd, use_rope=False, balance_state=True,
               groupnorm_att=False, use_tokenshift=True, torch_dtype="float32")
    g = torch.Generator().manual_seed(4)
    rnd = lambda *s, std=0.1: torch.randn(*s, generator=g) * std
    D = H * N
    sd = {"model.embed_tokens.weight": rnd(VOCAB, C, std=1.0), "model.norm.weight": 1 + rnd(C), "lm_head.weight": rnd(VOCAB, C)}
    for i in range(2):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": 1 + rnd(C), p + "post_attention_layernorm.weight": 1 + rnd(C),
                   p + "mlp.gate_proj.weight": rnd(96, C), p + "mlp.up_proj.weight": rnd(96, C), p + "mlp.down_proj.weight": rnd(C, 96)})
        a = p + "self_attn."
        sd.update({a + "q_proj.weight": rnd(D, C, std=0.3), a + "q_proj.bias": rnd(D), a + "k_proj.weight": rnd(HK * N, C, std=0.3),
                   a + "k_proj.bias": rnd(HK * N), a + "v_proj.weight": rnd(HK * N, C, std=0.3), a + "v_proj.bias": rnd(HK * N),
                   a + "o_proj.weight": rnd(C, D), a + "gate.weight": rnd(D, C),
                   a + "time_maa_x": rnd(1, 1, C, std=0.5), a + "time_maa_w1": rnd(C, 5 * R), a + "time_maa_w2": rnd(5, R, C, std=0.5),
                   a + "time_decay": -3 + rnd(1, 1, D, std=2.0), a + "time_decay_w1": rnd(C, Rd), a + "time_decay_w2": rnd(Rd, D, std=0.5)})
        for s in "rkvwg":
            sd[a + f"time_maa_{s}"] = rnd(1, 1, C, std=0.5)
    path = tmp_path / "released"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(path / "model.safetensors"))
    return str(path), {k: v.double() for k, v in sd.items()}


def reference_logits(sd, ids, n_layer=2, N=16, eps=1e-6):
    """SPEC §3 written out once more, independently: fp64, one token at a time, no batching tricks."""
    rms = lambda x, w: w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    h = sd["model.embed_tokens.weight"][ids[0]]                     # (T, C), batch of one
    T = h.shape[0]
    for i in range(n_layer):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        W = lambda n: sd[a + n]
        x = rms(h, sd[p + "input_layernorm.weight"])
        S = torch.zeros(H, N, N, dtype=torch.float64)
        out = []
        for t in range(T):
            xt, xp = x[t], x[t - 1] if t else torch.zeros(C, dtype=torch.float64)
            dx = xp - xt
            lora = torch.tanh((xt + dx * W("time_maa_x")[0, 0]) @ W("time_maa_w1")).view(5, -1)
            mix = {s: xt + dx * (W(f"time_maa_{s}")[0, 0] + lora[j] @ W("time_maa_w2")[j]) for j, s in enumerate("rkvwg")}
            r = (W("q_proj.weight") @ mix["r"] + W("q_proj.bias")).view(H, N)
            k = (W("k_proj.weight") @ mix["k"] + W("k_proj.bias")).view(HK, N).repeat_interleave(H // HK, 0)
            v = (W("v_proj.weight") @ mix["v"] + W("v_proj.bias")).view(HK, N).repeat_interleave(H // HK, 0)
            g = torch.sigmoid(W("gate.weight") @ mix["g"])
            d = W("time_decay")[0, 0] + torch.tanh(mix["w"] @ W("time_decay_w1")) @ W("time_decay_w2")
            w = torch.exp(torch.clamp(-torch.exp(d), min=-5.0)).view(H, N)
            k = k * (1 - w)
            S = w[:, :, None] * S + k[:, :, None] * v[:, None, :]
            y = torch.einsum("hk,hkv->hv", r, S).reshape(-1) / math.sqrt(N)
            out.append(W("o_proj.weight") @ (y * g))
        h = h + torch.stack(out)
        xm = rms(h, sd[p + "post_attention_layernorm.weight"])
        h = h + (F.silu(xm @ sd[p + "mlp.gate_proj.weight"].T) * (xm @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
    return rms(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def test_released_rwkv6qwen2_layout_matches_independent_reference(tmp_path):
    path, sd = released_checkpoint(tmp_path)
    model = qrwkv.load_model(path, dtype=torch.float32)
    assert model.config.lora_rank_tokenshift == 8 and model.config.qkv_bias and not model.config.o_bias
    ids = torch.randint(0, VOCAB, (1, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, _ = model(ids)
    ref = reference_logits(sd, ids)
    assert ref.abs().max() > 1.0      # non-trivial logits
    assert max_diff(logits[0], ref) <= 1e-4
