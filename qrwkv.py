"""
QRWKV: a softmax-attention decoder (Qwen2/2.5, Qwen3, LLaMA, Mistral, SmolLM2) whose attention blocks are
replaced, all or some, by RWKV-6 time-mix blocks -- the QRWKV6 / `rwkv6qwen2` architecture. Embeddings,
RMSNorms, SwiGLU MLPs and the LM head are the teacher's.

One class runs teachers, converted models and hybrids:

    import qrwkv
    model = qrwkv.load_model("path/to/hf_or_converted_dir", dtype=torch.float32)
    logits, state = model(input_ids)                 # (B, T, V), recurrent state / KV cache
    logits, state = model(next_ids, state=state)     # continues the sequence
    student = qrwkv.student_from_teacher(model)      # every attention block -> time-mix (SPEC §3 init)
    qrwkv.save_model(student, "out_dir", tokenizer_dir="path/to/teacher")

Tests: `python -m pytest -q`.
"""
import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from wkv_kernel import wkv6, wkv7

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral", "rwkv6qwen2", "rwkv7qwen2")
CONVERTED_MODEL_TYPES = ("rwkv6qwen2", "rwkv7qwen2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt", "chat_template.jinja")
# fields of config.json this file owns for converted models (everything else is copied from the teacher)
RWKV_FIELDS = ("lora_rank_tokenshift", "lora_rank_decay", "use_rope", "attention_bias", "attention_output_bias",
               "gate_rank_type", "balance_state", "groupnorm_att", "use_tokenshift",
               "attention_layers", "teacher_model_type", "qk_norm")


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    model_type: str
    vocab_size: int
    hidden_size: int                      # C
    intermediate_size: int
    num_hidden_layers: int                # L
    num_attention_heads: int              # H
    num_key_value_heads: int              # Hk
    head_dim: int                         # N
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None      # {"rope_type": "llama3", "factor": ..., ...} or None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False                # Qwen2: always true (not in its config.json)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False                 # Qwen3 per-head RMSNorm on q and k
    dtype: str = "float32"
    # RWKV-6 time-mix (SPEC §3); attention_layers = layers kept as softmax attention
    attention_layers: tuple = ()
    lora_rank_tokenshift: int | None = None
    lora_rank_decay: int | None = None
    use_rope: bool = False
    balance_state: bool = True
    groupnorm_att: bool = False
    use_tokenshift: bool = True
    teacher_model_type: str = "qwen2"
    # RWKV-7 student (rwkv7qwen2, section at the end of this file); student picks the time-mix class
    student: str = "rwkv6"
    lora_rank_iclr: int | None = None
    lora_rank_value_residual_mix: int | None = None
    lora_rank_gate: int | None = None
    gate_rank_type: int = 2
    raw: dict = field(default_factory=dict, repr=False)   # the config.json as read, written back on save

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json: model_type {mt!r} is not supported; use one of {', '.join(SUPPORTED_MODEL_TYPES)}")
        if d.get("use_sliding_window") or (mt == "mistral" and d.get("sliding_window") is not None):
            raise ValueError(f"config.json: sliding window attention (use_sliding_window / sliding_window="
                             f"{d.get('sliding_window')}) is not supported; set sliding_window to null if your sequences fit in it")
        converted = mt in CONVERTED_MODEL_TYPES
        family = d.get("teacher_model_type", "qwen2") if converted else mt
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"config.json: rope_type {rope_type!r} is not supported; supported: default, llama3")
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        C, H = d["hidden_size"], d["num_attention_heads"]
        n_layer = d["num_hidden_layers"]
        if converted:         # rwkv6qwen2 names both biases
            qkv_bias, o_bias = bool(d.get("attention_bias", True)), bool(d.get("attention_output_bias", False))
        elif family == "qwen2":  # hard-coded in Qwen2, absent from its config.json
            qkv_bias, o_bias = True, False
        else:                 # llama, qwen3: one flag for q, k, v and o; mistral: none
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        cfg = cls(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=C, intermediate_size=d["intermediate_size"],
            num_hidden_layers=n_layer, num_attention_heads=H,
            num_key_value_heads=d.get("num_key_value_heads") or H,
            head_dim=d.get("head_dim") or C // H,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=dict(rope) if rope_type == "llama3" else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias, o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=bool(d.get("qk_norm", family == "qwen3")),
            dtype=d.get("dtype") or d.get("torch_dtype") or "float32",
            attention_layers=tuple(d.get("attention_layers", [])) if converted else tuple(range(n_layer)),
            lora_rank_tokenshift=d.get("lora_rank_tokenshift"), lora_rank_decay=d.get("lora_rank_decay"),
            use_rope=bool(d.get("use_rope", False)), balance_state=bool(d.get("balance_state", True)),
            groupnorm_att=bool(d.get("groupnorm_att", False)), use_tokenshift=bool(d.get("use_tokenshift", True)),
            teacher_model_type=family, raw=dict(d))
        if cfg.lora_rank_tokenshift is None:        # SPEC §3 defaults; always written back on save
            cfg.lora_rank_tokenshift = 32 if C < 4096 else 64
        if cfg.lora_rank_decay is None:
            cfg.lora_rank_decay = 64 if C < 4096 else 128
        return rwkv7_config(cfg, d) if mt == "rwkv7qwen2" else cfg

    def to_dict(self) -> dict:
        """config.json of a converted model: the teacher's fields plus the rwkv6qwen2 ones (SPEC §3)."""
        if self.student == "rwkv7":
            return rwkv7_config_dict(self)
        d = dict(self.raw)
        for k in ("rope_scaling", "rope_parameters", "torch_dtype"):
            d.pop(k, None)
        d.update(model_type="rwkv6qwen2", architectures=["RWKV6Qwen2ForCausalLM"], dtype=self.dtype,
                 vocab_size=self.vocab_size, tie_word_embeddings=self.tie_word_embeddings, head_dim=self.head_dim,
                 rope_theta=self.rope_theta, lora_rank_tokenshift=self.lora_rank_tokenshift,
                 lora_rank_decay=self.lora_rank_decay, use_rope=self.use_rope, attention_bias=self.qkv_bias,
                 attention_output_bias=self.o_bias, gate_rank_type=1, balance_state=self.balance_state,
                 groupnorm_att=self.groupnorm_att, use_tokenshift=self.use_tokenshift,
                 # project extensions of the format
                 attention_layers=list(self.attention_layers), teacher_model_type=self.teacher_model_type,
                 qk_norm=self.qk_norm)
        if self.rope_scaling:
            d["rope_scaling"] = self.rope_scaling
        return d

    @property
    def is_converted(self) -> bool:
        return len(self.attention_layers) < self.num_hidden_layers


def load_config(path: str) -> Config:
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{path}: no config.json; pass a Hugging Face model directory or a converted QRWKV model")
    with open(f) as fh:
        return Config.from_dict(json.load(fh))


# ----------------------------------------------------------------------------- shared pieces

class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back before the weight (as HF does)."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_inv_freq(cfg: Config) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/N), with the llama3 long-context rescaling when configured."""
    N = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, N, 2, dtype=torch.float64, device="cpu") / N)
    if cfg.rope_scaling:
        s = cfg.rope_scaling
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)              # 0 at the low-freq edge, 1 at the high-freq edge
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float()


def apply_rope(x, cos, sin):
    """HF split-half rotary embedding: x*cos + rotate_half(x)*sin, x (B, T, heads, N)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    def __init__(self, cfg: Config):
        super().__init__()
        C, I, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(C, I, b), nn.Linear(C, I, b), nn.Linear(I, C, b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class QKVO(nn.Module):
    """The four projections (+ optional Qwen3 q/k norms) shared by attention and time-mix, so the names match."""
    def __init__(self, cfg: Config):
        super().__init__()
        C, H, Hk, N = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.Hk, self.N = H, Hk, N
        self.q_proj = nn.Linear(C, H * N, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, Hk * N, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, Hk * N, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * N, C, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(N, cfg.rms_norm_eps), RMSNorm(N, cfg.rms_norm_eps)

    def project(self, xq, xk, xv):
        """q (B,T,H,N), k and v (B,T,Hk,N)."""
        B, T, _ = xq.shape
        q = self.q_proj(xq).view(B, T, self.H, self.N)
        k = self.k_proj(xk).view(B, T, self.Hk, self.N)
        v = self.v_proj(xv).view(B, T, self.Hk, self.N)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


# ----------------------------------------------------------------------------- teacher attention

class Attention(QKVO):
    """Causal softmax attention with RoPE and GQA; state = KV cache (k, v) of shape (B, Hk, T_past, N)."""
    def forward(self, x, cos, sin, cache=None):
        q, k, v = self.project(x, x, x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        T, S = q.shape[2], k.shape[2]
        if T == 1:
            mask, causal = None, False
        elif S == T:
            mask, causal = None, True
        else:  # a chunk after a prefix: query t sees keys up to S - T + t
            mask, causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T), False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.H != self.Hk)
        return self.o_proj(y.transpose(1, 2).flatten(2)), (k, v)


# ----------------------------------------------------------------------------- RWKV-6 time-mix

class TimeMix(QKVO):
    """RWKV-6 time-mix of QRWKV6 (SPEC §3); state = (shift (B,1,C), kv (B,H,N,N) fp32 [key, value])."""
    def __init__(self, cfg: Config, layer_id: int):
        super().__init__(cfg)
        C, D = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
        R, Rd, L = cfg.lora_rank_tokenshift, cfg.lora_rank_decay, cfg.num_hidden_layers
        self.use_rope, self.balance_state, self.use_tokenshift = cfg.use_rope, cfg.balance_state, cfg.use_tokenshift
        self.gate = nn.Linear(C, D, bias=False)
        self.time_maa_x = nn.Parameter(torch.ones(1, 1, C))
        self.time_maa_r, self.time_maa_k, self.time_maa_v, self.time_maa_w, self.time_maa_g = (
            nn.Parameter(torch.zeros(1, 1, C)) for _ in range(5))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * R))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, R, C).uniform_(-0.01, 0.01))
        # d_n = -6 + 5 (n/(D-1))^(0.7 + 1.3 l/(L-1)): slow decay on late channels and deep layers
        ratio = torch.arange(D, dtype=torch.float32) / max(D - 1, 1)
        self.time_decay = nn.Parameter((-6 + 5 * ratio ** (0.7 + 1.3 * layer_id / max(L - 1, 1))).view(1, 1, D))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, Rd))
        self.time_decay_w2 = nn.Parameter(torch.empty(Rd, D).uniform_(-0.01, 0.01))
        nn.init.zeros_(self.gate.weight)
        if cfg.groupnorm_att:
            self.ln_x = nn.GroupNorm(self.H, D, eps=64e-5)

    def forward(self, x, cos, sin, state=None):
        B, T, C = x.shape
        shift, kv = state if state is not None else (None, None)
        # 1. data-dependent token shift: x_□ = x + δ·(maa_□ + tanh(x̂ W1) W2[□]),  δ = x₋₁ − x,  x̂ = x + δ·maa_x;
        #    the five mixes as one (5, B·T, C) tensor: maa_□ + m_□ in the batched matmul, then one x + δ·(...) pass
        if self.use_tokenshift:
            x_prev = (F.pad(x[:, :-1], (0, 0, 1, 0)) if shift is None else shift if T == 1
                      else torch.cat([shift, x[:, :-1]], dim=1))
            delta = x_prev - x
            lora = torch.tanh(torch.addcmul(x, delta, self.time_maa_x) @ self.time_maa_w1).view(B * T, 5, -1)
            maa = torch.cat([self.time_maa_r, self.time_maa_k, self.time_maa_v, self.time_maa_w, self.time_maa_g])
            mix = torch.baddbmm(maa, lora.transpose(0, 1), self.time_maa_w2)
            x_r, x_k, x_v, x_w, x_g = torch.addcmul(x.reshape(1, B * T, C), delta.view(1, B * T, C), mix).view(5, B, T, C).unbind(0)
        else:
            x_r = x_k = x_v = x_w = x_g = x
        # 2. projections and output gate
        r, k, v = self.project(x_r, x_k, x_v)
        g = torch.sigmoid(self.gate(x_g))
        # 3. decay: log w = max(-exp(time_decay + tanh(x_w W1) W2), -5), per channel, fp32, never log(w)
        # (the fp32 bias added outside the matmul: under bf16 autocast an addmm would round time_decay to bf16)
        d = self.time_decay + torch.tanh(x_w @ self.time_decay_w1) @ self.time_decay_w2
        log_w = d.float().exp().clamp(max=5.0).neg().view(B, T, self.H, self.N)
        # 4. optional RoPE; GQA: k and v repeated to H heads (k in one pass with the balancing k·(1 − w))
        if self.use_rope:
            r, k = apply_rope(r, cos, sin), apply_rope(k, cos, sin)
        G = self.H // self.Hk
        heads = lambda x: x.unsqueeze(3).expand(B, T, self.Hk, G, self.N).flatten(2, 3)  # (B, T, Hk, N) -> H heads
        v = heads(v) if G > 1 else v
        if self.balance_state:  # 5. state balancing: k ← k·(1 − w)
            k = (k.unsqueeze(3) * torch.expm1(log_w).neg().to(k.dtype).view(B, T, self.Hk, G, self.N)).flatten(2, 3)
        elif G > 1:
            k = heads(k)
        # 6. S_t = diag(w_t) S_{t-1} + k_tᵀ v_t;  y_t = N^(-1/2) r_t S_t
        y, kv = wkv6(r * self.N ** -0.5, k, v, log_w, state=kv)
        y = y.flatten(2)
        # 7. optional GroupNorm per head, gate, output projection
        if hasattr(self, "ln_x"):
            y = self.ln_x(y.reshape(B * T, -1)).view(B, T, -1)
        return self.o_proj(y * g), (x[:, -1:], kv)


# ----------------------------------------------------------------------------- the model

class Block(nn.Module):
    """h ← h + mixer(input_layernorm(h));  h ← h + MLP(post_attention_layernorm(h))."""
    def __init__(self, cfg: Config, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        mixer = TimeMix7 if cfg.student == "rwkv7" else TimeMix
        self.self_attn = Attention(cfg) if layer_id in cfg.attention_layers else mixer(cfg, layer_id)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, state=None, mixer_only=False):
        if mixer_only:  # teacher-forced (conversion step 1): h is already the normalised mixer input
            return self.self_attn(h, cos, sin, None)[0], None
        y, state = self.self_attn(self.input_layernorm(h), cos, sin, state)
        h = h + y
        return h + self.mlp(self.post_attention_layernorm(h)), state


@dataclass
class State:
    """Everything needed to continue a sequence: tokens seen so far and one entry per layer
    (time-mix: (shift, kv); attention: KV cache (k, v))."""
    pos: int
    layers: list

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for entry in self.layers for t in entry)


class QRWKV(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        share_value_residual(self.model.layers)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._inv_freq = None

    def rope(self, pos, T, device, dtype):
        """cos, sin for positions pos..pos+T-1, shaped (1, T, 1, N) to broadcast over (B, T, heads, N)."""
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inv_freq(self.config).to(device)
        freqs = torch.arange(pos, pos + T, device=device, dtype=torch.float32)[:, None] * self._inv_freq[None]
        emb = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids, state: State | None = None, return_hidden=False, mixer_inputs: dict | None = None):
        """input_ids (B, T) -> logits (B, T, V) (or final normed hidden states), and the state after the last token.
        Teacher-forced (conversion step 1): mixer_inputs {layer: normalised input (B, T, C)} -> ({layer: mixer output}, None),
        running only those layers' mixers, each through its block (so hooks on blocks, e.g. FSDP's, see the call)."""
        pos = state.pos if state is not None else 0
        if mixer_inputs is not None:
            x0 = next(iter(mixer_inputs.values()))
            cos, sin = self.rope(pos, input_ids.shape[1], x0.device, x0.dtype)
            return {i: self.model.layers[i](x, cos, sin, mixer_only=True)[0] for i, x in mixer_inputs.items()}, None
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(pos, input_ids.shape[1], h.device, h.dtype)
        new_layers = []
        for i, block in enumerate(self.model.layers):
            h, s = block(h, cos, sin, state.layers[i] if state is not None else None)
            new_layers.append(s)
        h = self.model.norm(h)
        return (h if return_hidden else self.lm_head(h)), State(pos + input_ids.shape[1], new_layers)

    @contextlib.contextmanager
    def capture_mixers(self, layers):
        """Within the block: {layer: (normalised mixer input, mixer output)} of the layers' forward passes, recorded by
        forward hooks on the mixers (the layer loop stays in forward; step-1 targets and calibration read it)."""
        io, hooks = {}, []
        for i in layers:
            hook = lambda mod, args, out, i=i: io.__setitem__(i, (args[0], out[0]))
            hooks.append(self.model.layers[i].self_attn.register_forward_hook(hook))
        try:
            yield io
        finally:
            for h in hooks:
                h.remove()

    def untie_lm_head(self):
        """Give the LM head its own copy of the embedding (distillation trains it separately)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = nn.Parameter(self.model.embed_tokens.weight.detach().clone())
            self.config.tie_word_embeddings = False


# ----------------------------------------------------------------------------- conversion, load, save

def student_from_teacher(teacher: QRWKV, attention_layers=(), student="rwkv6", **rwkv_options) -> QRWKV:
    """A new model whose layers not in `attention_layers` are time-mix blocks initialised per SPEC §3
    (student "rwkv6", rwkv6qwen2) or SPEC §9 (student "rwkv7", rwkv7qwen2: attention only in the last layers):
    q/k/v/o (+ biases, + Qwen3 q/k norms), embeddings, norms, MLPs and head copied from the teacher.

    Example:
        >>> student = student_from_teacher(teacher, attention_layers=(L - 1,), student="rwkv7")
        >>> logits, state = student(ids); save_model(student, "out")
    """
    if student not in ("rwkv6", "rwkv7"):
        raise ValueError(f"student must be 'rwkv6' or 'rwkv7', got {student!r}")
    if student == "rwkv7":
        rwkv_options = rwkv7_student_options(teacher.config, attention_layers, **rwkv_options)
    cfg = replace(teacher.config, attention_layers=tuple(attention_layers), **rwkv_options)
    p = next(teacher.parameters())
    with torch.device(p.device):
        student = QRWKV(cfg).to(p.dtype)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    fresh = ("gate", "time_maa", "time_decay", "ln_x") + RWKV7_FRESH
    assert not unexpected and all(any(f in m for f in fresh) for m in missing), (missing, unexpected)
    return student


def checkpoint_tensors(path: str):
    """Yield (name, tensor) from model.safetensors or the shards listed in model.safetensors.index.json, one at a time."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json; "
                                f"convert .bin checkpoints to safetensors first")
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


BF16_FLAGS = ("amx_bf16", "avx512_bf16")   # native bf16 matmul units: there bf16 matmuls run 3-8x faster than fp32


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16: without them (e.g. AVX2-only CPUs) bf16 is emulated, measured 4x slower than fp32."""
    return bool(cpu_flags() & set(BF16_FLAGS))


def auto_dtype(device) -> tuple:
    """(dtype, reason) for `--dtype auto`: bf16 on CUDA/ROCm GPUs with bf16 and on CPUs with native bf16, else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return (torch.bfloat16, "GPU with bf16") if ok else (torch.float32, "GPU without bf16")
    if cpu_has_native_bf16():
        return torch.bfloat16, "CPU with native bf16 (AMX-BF16 / AVX512-BF16)"
    return torch.float32, "CPU without native bf16 (no AMX-BF16 / AVX512-BF16: bf16 would be emulated, slower)"


def load_model(path: str, dtype=None, device="cpu") -> QRWKV:
    """Teacher, converted or hybrid model from a directory. Weights are placed tensor by tensor into a model
    built on the meta device, so only one copy of them is ever in memory."""
    cfg = load_config(path)
    dtype = dtype or DTYPES.get(cfg.dtype, torch.float32)
    with torch.device("meta"):
        model = QRWKV(cfg)
    expected = dict(model.named_parameters())
    for name, tensor in checkpoint_tensors(path):
        if name not in expected:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            raise ValueError(f"{path}: unexpected tensor {name} for a {cfg.model_type} model; the checkpoint does not match config.json")
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[name].shape)}")
        module, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(module), attr, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors of config.json's model, e.g. {missing[0]}")
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def save_model(model: QRWKV, out_dir: str, tokenizer_dir: str | None = None, max_shard_bytes: int = 4 << 30):
    """Write config.json, safetensors (sharded above max_shard_bytes, with an index) and the tokenizer files,
    into a temporary directory renamed into place at the end."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    cfg = model.config
    cfg.dtype = {v: k for k, v in DTYPES.items()}[next(model.parameters()).dtype]
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg.to_dict() if cfg.is_converted else cfg.raw, f, indent=2)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.state_dict().items()
               if not (n == "lm_head.weight" and cfg.tie_word_embeddings)}
    shards, size = [{}], 0
    for name, t in tensors.items():
        if size and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}, f, indent=2)
    for name in TOKENIZER_FILES if tokenizer_dir else ():
        if os.path.isfile(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), tmp)
    if os.path.exists(out_dir):  # swap in the new directory, then drop the old one
        os.replace(out_dir, out_dir.rstrip("/") + ".old")
    os.replace(tmp, out_dir)
    shutil.rmtree(out_dir.rstrip("/") + ".old", ignore_errors=True)


# ----------------------------------------------------------------------------- RWKV-7 student (rwkv7qwen2)
# The RAD-RWKV7 time-mix of the final released rwkv7qwen2 code (SPEC §9; tensors, config fields and math from
# notes/rwkv7qwen2.md §2-6).  Per layer, x = input_layernorm(h), no token shift, no bonus:
#   r, k, v = q/k/v_proj(x);  log w = -e^{-1/2} σ(w0 + tanh(x w1) w2) ∈ (-0.6065, 0);  iclr = σ(a0 + x a1 a2)
#   g = σ(x g1) g2 (gate_rank_type 2) or σ(gate(x)) (1);  RoPE on r, k (use_rope), then k, v repeated to H heads
#   balance_state:  κ̂ = k/‖k‖,  k̃ = k ⊙ (1 - w + iclr);  else  κ̂ = normalize(k ⊙ k_k),  k̃ = k ⊙ (1 + (iclr - 1) k_a)
#   value residual: layer 0 keeps v_first = v;  layer ℓ > 0:  v ← v + (v_first - v) ⊙ σ(v0 + x v1 v2)
#   y = wkv7(r, k̃, v, log w, a = -κ̂, b = κ̂ ⊙ iclr);  y ← GroupNorm_H(y) (groupnorm_att) or y·N^{-1/2};  o_proj(y ⊙ g)
# Tensors stored but unused, kept for the released layout: r_k (the bonus is commented out in the released
# code), k_k and k_a when balance_state, v0/v1/v2 in layer 0.  D = H·N sizes w0, a0, v0, k_k, k_a, w2, a2,
# v2, g2 (the released HF file assumes D = hidden_size, true for every Qwen2.5).

# config.json field -> (exponent, multiplier) of the released default rank 32·max(1, round(C^e·m / 32))
RWKV7_RANKS = {"lora_rank_decay": (0.5, 1.8), "lora_rank_iclr": (0.5, 1.8),
               "lora_rank_value_residual_mix": (0.5, 1.3), "lora_rank_gate": (0.8, 0.6)}
RWKV7_FRESH = tuple(f"self_attn.{n}" for n in ("w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1", "v2", "g1", "g2",
                                                "k_k", "k_a", "r_k"))


def rwkv7_lora_rank(C: int, field: str) -> int:
    e, m = RWKV7_RANKS[field]
    return 32 * max(1, round(C ** e * m / 32))


def ortho_(p: torch.Tensor, scale: float) -> torch.Tensor:
    """The released init: orthogonal with gain scale·√(rows/cols) when rows > cols, else scale."""
    rows, cols = p.shape
    return nn.init.orthogonal_(p, gain=scale * (math.sqrt(rows / cols) if rows > cols else 1.0))


class TimeMix7(QKVO):
    """RAD-RWKV7 time-mix (see the section comment); state = (kv,) with kv (B, H, N, N) fp32 [key, value], per
    query head.  Nothing else carries over time: v_first is per token (layer 0's values of the same tokens, which
    reach later layers through `self.shared`, one dict per model, see share_value_residual) and RoPE's position
    is State.pos."""
    def __init__(self, cfg: Config, layer_id: int):
        super().__init__(cfg)
        C, D, L = cfg.hidden_size, self.H * self.N, cfg.num_hidden_layers
        self.layer_id, self.shared = layer_id, {}
        self.use_rope, self.balance_state, self.gate_rank_type = cfg.use_rope, cfg.balance_state, cfg.gate_rank_type
        Rw, Ra, Rv, Rg = cfg.lora_rank_decay, cfg.lora_rank_iclr, cfg.lora_rank_value_residual_mix, cfg.lora_rank_gate
        # w0 = d_n + 0.5, d_n = -7 + 5 (n/(D-1))^(0.85 + (ℓ/(L-1))^0.5) (the 0.5 offsets the softplus of older code)
        ratio = torch.arange(D, dtype=torch.float32) / max(D - 1, 1)
        self.w0 = nn.Parameter((-6.5 + 5 * ratio ** (0.85 + (layer_id / max(L - 1, 1)) ** 0.5)).view(1, 1, D))
        self.w1, self.w2 = nn.Parameter(torch.zeros(C, Rw)), nn.Parameter(ortho_(torch.empty(Rw, D), 0.1))
        self.a0, self.a1 = nn.Parameter(torch.zeros(1, 1, D)), nn.Parameter(torch.zeros(C, Ra))
        self.a2 = nn.Parameter(ortho_(torch.empty(Ra, D), 0.1))
        # layer 0 stores v0/v1/v2 but never uses them (the released code leaves them uninitialised there)
        self.v0, self.v1 = nn.Parameter(torch.ones(1, 1, D)), nn.Parameter(torch.zeros(C, Rv))
        self.v2 = nn.Parameter(ortho_(torch.empty(Rv, D), 0.1))
        if cfg.gate_rank_type == 2:  # g1 = 0: the gate starts as the constant 0.5 · column sums of g2
            self.g1, self.g2 = nn.Parameter(torch.zeros(C, Rg)), nn.Parameter(ortho_(torch.empty(Rg, D), 0.1))
        else:
            self.gate = nn.Linear(C, D, bias=False)
            nn.init.zeros_(self.gate.weight)
        self.k_k, self.k_a = nn.Parameter(torch.full((1, 1, D), 0.85)), nn.Parameter(torch.ones(1, 1, D))
        self.r_k = nn.Parameter(torch.zeros(self.H, self.N))
        if cfg.groupnorm_att:
            self.ln_x = nn.GroupNorm(self.H, D, eps=self.N * 1e-5)

    def unused_parameters(self) -> list:
        """Stored for the released layout but never read by forward, so they get no gradient (exclude them from
        training, or DDP waits for them): r_k; v0, v1, v2 in layer 0; k_k, k_a when balance_state."""
        names = ["r_k"] + (["v0", "v1", "v2"] if self.layer_id == 0 else []) + (["k_k", "k_a"] if self.balance_state else [])
        return [getattr(self, n) for n in names]

    def value_residual(self, x, v):
        """Layer 0: remember v (B, T, H, N) as v_first.  Later layers: v + (v_first - v) ⊙ σ(v0 + x v1 v2)."""
        if self.layer_id == 0:
            self.shared["v_first"] = v
            return v
        v_first = self.shared.get("v_first")
        if v_first is None or v_first.shape != v.shape:
            raise RuntimeError(f"rwkv7 layer {self.layer_id}: layer 0 must run first in the same forward (value residual)")
        nu = torch.sigmoid(self.v0 + (x @ self.v1) @ self.v2).view_as(v)
        return v + (v_first - v) * nu

    def forward(self, x, cos, sin, state=None):
        B, T, C = x.shape
        H, N, G = self.H, self.N, self.H // self.Hk
        r, k, v = self.project(x, x, x)
        log_w = (-math.exp(-0.5) * torch.sigmoid((self.w0 + torch.tanh(x @ self.w1) @ self.w2).float())).view(B, T, H, N)
        iclr = torch.sigmoid(self.a0 + (x @ self.a1) @ self.a2).view(B, T, H, N)
        g = torch.sigmoid(x @ self.g1) @ self.g2 if self.gate_rank_type == 2 else torch.sigmoid(self.gate(x))
        if self.use_rope:  # before the GQA repeat, where the teacher applies it
            r, k = apply_rope(r, cos, sin), apply_rope(k, cos, sin)
        if G > 1:  # query head h reads KV head h // G
            k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
        v = self.value_residual(x, v)
        if self.balance_state:  # 1 - w = -expm1(log w): no cancellation for slow channels
            kk = F.normalize(k, dim=-1)
            k = k * (-torch.expm1(log_w) + iclr).to(k.dtype)
        else:
            kk = F.normalize(k * self.k_k.view(H, N), dim=-1)
            k = k * (1 + (iclr - 1) * self.k_a.view(H, N))
        y, kv = wkv7(r, k, v, log_w, -kk, kk * iclr, state=None if state is None else state[0])
        y = y.flatten(2)
        if hasattr(self, "ln_x"):  # per-head GroupNorm, in fp32 like the released code
            ln = self.ln_x
            y = F.group_norm(y.reshape(B * T, -1).float(), H, ln.weight.float(), ln.bias.float(), ln.eps).view(B, T, -1).to(x.dtype)
        else:
            y = y * N ** -0.5
        return self.o_proj(y * g), (kv,)


def share_value_residual(layers):
    """One dict for all TimeMix7 of a model: layer 0 writes v_first into it, later layers read it."""
    shared = {}
    for block in layers:
        if isinstance(block.self_attn, TimeMix7):
            block.self_attn.shared = shared


def _rwkv7_checked(L: int, n: int, gate_rank_type, where: str):
    if not 0 <= n < L:
        raise ValueError(f"{where}: num_attention_layers {n} must be in [0, {L}): rwkv7qwen2 keeps attention only in the "
                         f"last layers and layer 0 must be RWKV (it provides the value residual)")
    if gate_rank_type not in (1, 2):
        raise ValueError(f"{where}: gate_rank_type {gate_rank_type!r} is not supported; rwkv7qwen2 has 1 (full gate) or 2 (low-rank gate)")


def rwkv7_config(cfg: Config, d: dict) -> Config:
    """Config of an rwkv7qwen2 config.json: the last num_attention_layers layers are attention; ranks null/0 mean
    the released formula; use_tokenshift is stored only (this design has no token shift)."""
    L, n, gt = cfg.num_hidden_layers, d.get("num_attention_layers") or 0, d.get("gate_rank_type", 2)
    _rwkv7_checked(L, n, gt, "config.json")
    ranks = {f: d.get(f) or rwkv7_lora_rank(cfg.hidden_size, f) for f in RWKV7_RANKS}
    return replace(cfg, student="rwkv7", attention_layers=tuple(range(L - n, L)), gate_rank_type=gt,
                   use_tokenshift=bool(d.get("use_tokenshift", False)), **ranks)


def rwkv7_config_dict(cfg: Config) -> dict:
    """config.json of an rwkv7qwen2 model: the rwkv6qwen2 dict with the RWKV-6-only fields swapped for RWKV-7 ones."""
    d = replace(cfg, student="rwkv6").to_dict()
    for k in ("lora_rank_tokenshift", "attention_layers"):
        d.pop(k)
    d.update(model_type="rwkv7qwen2", architectures=["RWKV7Qwen2ForCausalLM"], gate_rank_type=cfg.gate_rank_type,
             use_tokenshift=False, num_attention_layers=len(cfg.attention_layers),
             **{f: getattr(cfg, f) for f in RWKV7_RANKS})
    return d


def rwkv7_student_options(teacher_cfg: Config, attention_layers, **options) -> dict:
    """Config fields of an rwkv7 student: the released training recipe's variant (configs/qwerky7.yaml: RoPE,
    standard keys, GroupNorm, low-rank gate) and the released ranks, unless given in `options`."""
    L, n = teacher_cfg.num_hidden_layers, len(attention_layers)
    if sorted(attention_layers) != list(range(L - n, L)):
        raise ValueError(f"attention_layers {tuple(attention_layers)}: an rwkv7qwen2 model keeps attention only in "
                         f"the last layers (num_attention_layers); use e.g. {tuple(range(L - max(n, 1), L))}")
    opts = dict(student="rwkv7", use_rope=True, balance_state=False, groupnorm_att=True, gate_rank_type=2,
                use_tokenshift=False, **{f: rwkv7_lora_rank(teacher_cfg.hidden_size, f) for f in RWKV7_RANKS})
    opts.update(options)
    _rwkv7_checked(L, n, opts["gate_rank_type"], "rwkv7 student")
    return opts
