"""Tests of the RWKV-7 student (rwkv7qwen2) in qrwkv.py: random-weight checkpoints written here in the released
layout (names and shapes from notes/rwkv7qwen2.md §2-3) load and match an independent fp64 per-token reference
of the architecture written in this file from the notes; full sequence = pieces = token by token; save/load;
the student built from a teacher; refusals.   python -m pytest -q test_qrwkv7.py"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import qrwkv

VOCAB, C, I, L, H = 96, 64, 80, 3, 4
N = C // H

# three variants of the final released design (and the project's hybrid: the last layer kept as attention)
VARIANTS = {
    "balanced-lowrank-gate-gqa": dict(balance_state=True, groupnorm_att=False, use_rope=True, gate_rank_type=2,
                                      num_key_value_heads=2, num_attention_layers=0, lora_rank_decay=8,
                                      lora_rank_iclr=8, lora_rank_value_residual_mix=8, lora_rank_gate=8),
    "standard-groupnorm-fullgate-hybrid": dict(balance_state=False, groupnorm_att=True, use_rope=True, gate_rank_type=1,
                                               num_key_value_heads=2, num_attention_layers=1, lora_rank_decay=16,
                                               lora_rank_iclr=8, lora_rank_value_residual_mix=4, lora_rank_gate=8),
    "standard-norope-tied-formula-ranks": dict(balance_state=False, groupnorm_att=False, use_rope=False, gate_rank_type=2,
                                               num_key_value_heads=4, num_attention_layers=0, tie_word_embeddings=True,
                                               attention_output_bias=True, lora_rank_decay=None, lora_rank_iclr=0),
}


def released_config(**over):
    d = dict(model_type="rwkv7qwen2", architectures=["RWKV7Qwen2ForCausalLM"], vocab_size=VOCAB, hidden_size=C,
             intermediate_size=I, num_hidden_layers=L, num_attention_heads=H, rms_norm_eps=1e-6, rope_theta=10000.0,
             attention_bias=True, attention_output_bias=False, tie_word_embeddings=False, use_tokenshift=False)
    d.update(over)
    return d


def released_tensors(cfg, seed=0):
    """Random tensors under the released names/shapes.  Tensors the design stores but never reads get NaN
    (r_k everywhere, v0/v1/v2 in layer 0, k_k/k_a when balance_state), so using one would show."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale
    Hk = cfg["num_key_value_heads"]
    rank = lambda f, e, m: cfg.get(f) or 32 * max(1, round(C ** e * m / 32))
    Rw, Ra, Rv, Rg = rank("lora_rank_decay", .5, 1.8), rank("lora_rank_iclr", .5, 1.8), \
        rank("lora_rank_value_residual_mix", .5, 1.3), rank("lora_rank_gate", .8, .6)
    W = {"model.embed_tokens.weight": rnd(VOCAB, C), "model.norm.weight": 1 + rnd(C, scale=0.2)}
    if not cfg.get("tie_word_embeddings"):
        W["lm_head.weight"] = rnd(VOCAB, C, scale=C ** -0.5)
    nan = lambda *s: torch.full(s, float("nan"))
    for i in range(L):
        p = f"model.layers.{i}."
        W.update({p + "input_layernorm.weight": 1 + rnd(C, scale=0.2), p + "post_attention_layernorm.weight": 1 + rnd(C, scale=0.2),
                  p + "mlp.gate_proj.weight": rnd(I, C, scale=C ** -0.5), p + "mlp.up_proj.weight": rnd(I, C, scale=C ** -0.5),
                  p + "mlp.down_proj.weight": rnd(C, I, scale=I ** -0.5)})
        a = p + "self_attn."
        W.update({a + "q_proj.weight": rnd(C, C, scale=C ** -0.5), a + "q_proj.bias": rnd(C, scale=0.3),
                  a + "k_proj.weight": rnd(Hk * N, C, scale=C ** -0.5), a + "k_proj.bias": rnd(Hk * N, scale=0.3),
                  a + "v_proj.weight": rnd(Hk * N, C, scale=C ** -0.5), a + "v_proj.bias": rnd(Hk * N, scale=0.3),
                  a + "o_proj.weight": rnd(C, C, scale=C ** -0.5)})
        if cfg.get("attention_output_bias"):
            W[a + "o_proj.bias"] = rnd(C, scale=0.1)
        if i >= L - cfg["num_attention_layers"]:
            continue  # a Qwen2 attention layer: q/k/v/o only
        W.update({a + "w0": rnd(1, 1, C), a + "w1": rnd(C, Rw, scale=0.3), a + "w2": rnd(Rw, C, scale=0.3),
                  a + "a0": rnd(1, 1, C), a + "a1": rnd(C, Ra, scale=0.3), a + "a2": rnd(Ra, C, scale=0.3),
                  a + "v0": rnd(1, 1, C), a + "v1": rnd(C, Rv, scale=0.3), a + "v2": rnd(Rv, C, scale=0.3),
                  a + "k_k": 0.5 + rnd(1, 1, C).abs(), a + "k_a": 0.5 + rnd(1, 1, C).abs(), a + "r_k": nan(H, N)})
        if cfg["gate_rank_type"] == 2:
            W.update({a + "g1": rnd(C, Rg, scale=0.3), a + "g2": rnd(Rg, C, scale=0.3)})
        else:
            W[a + "gate.weight"] = rnd(C, C, scale=C ** -0.5)
        if cfg["groupnorm_att"]:
            W.update({a + "ln_x.weight": 1 + rnd(C, scale=0.2), a + "ln_x.bias": rnd(C, scale=0.2)})
        if i == 0:
            W.update({a + "v0": nan(1, 1, C), a + "v1": nan(C, Rv), a + "v2": nan(Rv, C)})
        if cfg["balance_state"]:
            W.update({a + "k_k": nan(1, 1, C), a + "k_a": nan(1, 1, C)})
    return W


def write_checkpoint(path, variant, seed=0):
    cfg = released_config(**VARIANTS[variant])
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    W = released_tensors(cfg, seed)
    save_file(W, str(path / "model.safetensors"))
    return cfg, W


# ----------------------------------------------------------------------------- independent fp64 reference

def rms(x, w, eps=1e-6):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope(x, pos, theta):
    """Split-half rotary on (B, T, heads, N) at positions pos (T,)."""
    n = x.shape[-1]
    ang = pos[:, None].double() * theta ** (-torch.arange(0, n, 2, dtype=torch.float64) / n)
    cos, sin = torch.cat([ang.cos()] * 2, -1)[None, :, None], torch.cat([ang.sin()] * 2, -1)[None, :, None]
    return x * cos + torch.cat([-x[..., n // 2:], x[..., :n // 2]], -1) * sin


def ref_mixer(W, a, x, cfg, v_first):
    """RAD-RWKV7 per token, state Wv[value, key] as in the paper (row vectors): Wv <- Wv (diag(w) - κ̂ᵀ(iclr ⊙ κ̂))
    + vᵀk̃;  y = Wv r."""
    B, T, _ = x.shape
    Hk, G = cfg["num_key_value_heads"], H // cfg["num_key_value_heads"]
    lin = lambda name, y: y @ W[a + name + ".weight"].T + (W[a + name + ".bias"] if a + name + ".bias" in W else 0)
    r, k, v = lin("q_proj", x).view(B, T, H, N), lin("k_proj", x).view(B, T, Hk, N), lin("v_proj", x).view(B, T, Hk, N)
    w = torch.exp(-math.exp(-0.5) * torch.sigmoid(W[a + "w0"] + torch.tanh(x @ W[a + "w1"]) @ W[a + "w2"])).view(B, T, H, N)
    iclr = torch.sigmoid(W[a + "a0"] + x @ W[a + "a1"] @ W[a + "a2"]).view(B, T, H, N)
    g = torch.sigmoid(x @ W[a + "g1"]) @ W[a + "g2"] if cfg["gate_rank_type"] == 2 else torch.sigmoid(x @ W[a + "gate.weight"].T)
    if cfg["use_rope"]:
        pos = torch.arange(T)
        r, k = rope(r, pos, cfg["rope_theta"]), rope(k, pos, cfg["rope_theta"])
    k, v = (torch.stack([z[:, :, h // G] for h in range(H)], 2) for z in (k, v))  # head h reads KV head h // G
    if v_first is None:
        v_first = v
    else:
        nu = torch.sigmoid(W[a + "v0"] + x @ W[a + "v1"] @ W[a + "v2"]).view(B, T, H, N)
        v = v * (1 - nu) + v_first * nu
    if cfg["balance_state"]:
        kk, kt = k / k.norm(dim=-1, keepdim=True), k * (1 - w + iclr)
    else:
        kq = k * W[a + "k_k"].view(H, N)
        kk, kt = kq / kq.norm(dim=-1, keepdim=True), k * (1 + (iclr - 1) * W[a + "k_a"].view(H, N))
    Wv, ys = torch.zeros(B, H, N, N, dtype=torch.float64), []
    for t in range(T):
        removed = torch.einsum("bhvk,bhk->bhv", Wv, kk[:, t])
        Wv = Wv * w[:, t, :, None, :] - removed[..., None] * (iclr[:, t] * kk[:, t])[:, :, None, :] \
            + v[:, t, :, :, None] * kt[:, t, :, None, :]
        ys.append(torch.einsum("bhvk,bhk->bhv", Wv, r[:, t]))
    y = torch.stack(ys, 1)
    if cfg["groupnorm_att"]:
        mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
        y = ((y - mu) / torch.sqrt(var + N * 1e-5)).flatten(2) * W[a + "ln_x.weight"] + W[a + "ln_x.bias"]
    else:
        y = y.flatten(2) / math.sqrt(N)
    return lin("o_proj", y * g), v_first


def ref_attention(W, a, x, cfg):
    """Qwen2 causal softmax attention with RoPE and GQA."""
    B, T, _ = x.shape
    Hk = cfg["num_key_value_heads"]
    lin = lambda name, y: y @ W[a + name + ".weight"].T + (W[a + name + ".bias"] if a + name + ".bias" in W else 0)
    q, k, v = lin("q_proj", x).view(B, T, H, N), lin("k_proj", x).view(B, T, Hk, N), lin("v_proj", x).view(B, T, Hk, N)
    pos = torch.arange(T)
    q, k = rope(q, pos, cfg["rope_theta"]), rope(k, pos, cfg["rope_theta"])
    k, v = k.repeat_interleave(H // Hk, 2), v.repeat_interleave(H // Hk, 2)
    s = torch.einsum("bthn,bshn->bhts", q, k) / math.sqrt(N)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    return lin("o_proj", torch.einsum("bhts,bshn->bthn", s.softmax(-1), v).flatten(2))


def ref_logits(W, cfg, ids):
    W = {n: t.double() for n, t in W.items()}
    h, v_first = W["model.embed_tokens.weight"][ids], None
    for i in range(L):
        p = f"model.layers.{i}."
        x = rms(h, W[p + "input_layernorm.weight"])
        if i >= L - cfg["num_attention_layers"]:
            h = h + ref_attention(W, p + "self_attn.", x, cfg)
        else:
            y, v_first = ref_mixer(W, p + "self_attn.", x, cfg, v_first)
            h = h + y
        x = rms(h, W[p + "post_attention_layernorm.weight"])
        h = h + (F.silu(x @ W[p + "mlp.gate_proj.weight"].T) * (x @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
    head = W["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else W["lm_head.weight"]
    return rms(h, W["model.norm.weight"]) @ head.T


# ----------------------------------------------------------------------------- tests

def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_released_layout_matches_fp64_reference(tmp_path, variant):
    cfg, W = write_checkpoint(tmp_path / "m", variant)
    model = qrwkv.load_model(str(tmp_path / "m"), dtype=torch.float32)
    assert model.config.student == "rwkv7"
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, state = model(ids)
    ref = ref_logits(W, cfg, ids)
    assert torch.isfinite(logits).all()
    assert max_diff(logits, ref) <= 1e-4 * max(1.0, ref.abs().max().item())
    assert ref.std() > 0.5  # the reference is not trivially small


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_equals_pieces_equals_token_by_token(tmp_path, variant):
    write_checkpoint(tmp_path / "m", variant, seed=2)
    model = qrwkv.load_model(str(tmp_path / "m"), dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, st_full = model(ids)
        outs, st = [], None
        for a, b in ((0, 17), (17, 18), (18, 40)):
            o, st = model(ids[:, a:b], state=st)
            outs.append(o)
        assert max_diff(torch.cat(outs, 1), full) <= 1e-4
        outs, st = [], None
        for t in range(40):
            o, st = model(ids[:, t:t + 1], state=st)
            outs.append(o)
        assert max_diff(torch.cat(outs, 1), full) <= 1e-4
    assert st.pos == 40
    for i, (entry, block) in enumerate(zip(st.layers, model.model.layers)):
        if isinstance(block.self_attn, qrwkv.TimeMix7):  # (kv,) fp32 [key, value] per query head
            assert len(entry) == 1 and entry[0].shape == (2, H, N, N) and entry[0].dtype == torch.float32
            assert max_diff(entry[0], st_full.layers[i][0]) <= 1e-4


def test_save_load_round_trip(tmp_path):
    cfg, W = write_checkpoint(tmp_path / "m", "standard-groupnorm-fullgate-hybrid")
    model = qrwkv.load_model(str(tmp_path / "m"), dtype=torch.float32)
    qrwkv.save_model(model, str(tmp_path / "out"))
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert saved.keys() == W.keys()
    for n, t in W.items():
        torch.testing.assert_close(saved[n], t, rtol=0, atol=0, equal_nan=True)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    for field in ("model_type", "architectures", "balance_state", "groupnorm_att", "use_rope", "gate_rank_type",
                  "num_attention_layers", "lora_rank_decay", "lora_rank_iclr", "attention_bias", "attention_output_bias"):
        assert written[field] == cfg[field], field
    assert "lora_rank_tokenshift" not in written and "attention_layers" not in written
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert qrwkv.load_model(str(tmp_path / "out"))(ids)[0].equal(model(ids)[0])


def tiny_teacher(**over):
    d = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=C, intermediate_size=I, num_hidden_layers=L,
             num_attention_heads=H, num_key_value_heads=2)
    d.update(over)
    torch.manual_seed(0)
    return qrwkv.QRWKV(qrwkv.Config.from_dict(d)).eval()


def test_student_from_teacher_init_and_save(tmp_path):
    teacher = tiny_teacher()
    student = qrwkv.student_from_teacher(teacher, attention_layers=(L - 1,), student="rwkv7").eval()
    sd, td = student.state_dict(), teacher.state_dict()
    for n in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "v_proj.bias", "o_proj.weight"):
        assert sd[f"model.layers.0.self_attn.{n}"].equal(td[f"model.layers.0.self_attn.{n}"])
    assert isinstance(student.model.layers[L - 1].self_attn, qrwkv.Attention)
    tm = student.model.layers[1].self_attn
    assert isinstance(tm, qrwkv.TimeMix7) and tm.use_rope and not tm.balance_state and hasattr(tm, "ln_x")
    # released init: w0 = -6.5 + 5 (n/(C-1))^(0.85 + (l/(L-1))^0.5), lora inputs 0, ν = σ(1), a = 0.5, gate g1 = 0
    n = torch.arange(C) / (C - 1)
    torch.testing.assert_close(tm.w0.flatten(), -6.5 + 5 * n ** (0.85 + (1 / (L - 1)) ** 0.5))
    assert tm.w1.eq(0).all() and tm.a1.eq(0).all() and tm.g1.eq(0).all() and tm.v0.eq(1).all()
    torch.testing.assert_close(tm.w2 @ tm.w2.T, 0.01 * torch.eye(tm.w2.shape[0]))  # orthogonal rows, gain 0.1
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, state = student(ids)
    assert torch.isfinite(logits).all() and state.nbytes() > 0
    qrwkv.save_model(student, str(tmp_path / "s"))
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["model_type"] == "rwkv7qwen2" and cfg["num_attention_layers"] == 1 and cfg["gate_rank_type"] == 2
    with torch.no_grad():
        assert qrwkv.load_model(str(tmp_path / "s"))(ids)[0].equal(logits)


def test_rwkv6_stays_the_default():
    student = qrwkv.student_from_teacher(tiny_teacher())
    assert all(isinstance(b.self_attn, qrwkv.TimeMix) for b in student.model.layers)
    assert student.config.to_dict()["model_type"] == "rwkv6qwen2"


@pytest.mark.parametrize("balance_state", [True, False])
def test_gradients_reach_exactly_the_used_parameters(balance_state):
    """Every time-mix parameter gets a gradient except TimeMix7.unused_parameters() (r_k, layer 0's v0/v1/v2,
    k_k/k_a when balance_state), which get none."""
    student = qrwkv.student_from_teacher(tiny_teacher(), student="rwkv7", balance_state=balance_state, gate_rank_type=1)
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(6))
    student(ids)[0].square().mean().backward()
    for i, block in enumerate(student.model.layers):
        tm = block.self_attn
        unused = {id(p) for p in tm.unused_parameters()}
        assert len(unused) == 1 + 3 * (i == 0) + 2 * balance_state
        for name, p in tm.named_parameters():
            assert (p.grad is None) == (id(p) in unused), (i, name)
        for name in ("w1", "a1", "gate.weight", "q_proj.weight", "k_proj.weight") + (("v1",) if i else ()):
            assert tm.get_parameter(name).grad.abs().sum() > 0, (i, name)


@pytest.mark.parametrize("over,field", [(dict(gate_rank_type=3), "gate_rank_type"),
                                        (dict(num_attention_layers=L), "num_attention_layers")])
def test_unsupported_config_values_are_refused(tmp_path, over, field):
    (tmp_path / "config.json").write_text(json.dumps(released_config(num_key_value_heads=2, **over)))
    with pytest.raises(ValueError, match=field) as e:
        qrwkv.load_model(str(tmp_path))
    assert "\n" not in str(e.value)


def test_attention_only_in_the_last_layers():
    with pytest.raises(ValueError, match="last layers"):
        qrwkv.student_from_teacher(tiny_teacher(), attention_layers=(0,), student="rwkv7")
    with pytest.raises(ValueError, match="student"):
        qrwkv.student_from_teacher(tiny_teacher(), student="rwkv8")
