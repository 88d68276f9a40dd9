"""
Teacher-calibrated initialisation of the RWKV-6 time-mix blocks (SPEC §7 lever 1; issue 11, item 1), and of the
RWKV-7 ones (`calibrate_rwkv7`: a unit gate and a per-channel output affine, the last section).

A fresh student (qrwkv.student_from_teacher, SPEC §3 init) copies q/k/v/o from the teacher, but its mixer is far
from the teacher's attention: on SmolLM2-135M the median relative error of a layer's output is ~1.6, worse than
outputting zero. Before step 1, `calibrate_student` runs the teacher on a few batches, records for every converted
layer its normalised attention input x, its per-head attention output z (the input of o_proj) and its output y
(forward hooks), and then fixes each time-mix block in closed form, layer by layer:

  decay      per head, a centre for time_decay (channels keep a spread around it): "distance" from the mean
             distance of the teacher head's attention, or "search" = the centre on a grid whose least-squares
             readout fits that head's z best;
  readout    "channel": per key channel n of head h a weight c_hn, least squares of the student's per-channel
             contributions onto z_h, folded into q_proj's rows (r_n scales channel n's contribution; this also
             absorbs the gate's σ(0) = 0.5 start); then, with "channel" or "head", per-head amplitudes α_h by
             least squares onto y, folded into o_proj's columns; "gate": o_proj × 2 (the 0.5 start undone).
             With q/k norms (Qwen3) or use_rope a per-channel scale of r cannot be folded into q_proj, so
             "channel" falls back to "head" there;
  refit_o    optionally o_proj re-fitted by ridge regression (towards its current value) onto y.

Measured on SmolLM2-135M-Instruct (calibration: the first 2 x 512 tokens of the training documents; evaluation:
4 x 512 tokens of the last 5% of documents; teacher perplexity 13.5). Step-0 alignment loss / median per-layer
relative error / student perplexity / KL / top-1 agreement:
  plain SPEC §3 init                      3.64 / 1.62 / 1.35M / 11.6 / 1.8%
  readout "gate" (o_proj x 2)             6.64 / 3.07 / 6.1M  / 13.2 / 0.8%   (the plain output is already too big)
  readout "head"                          1.38 / 0.90 / 4379  / 6.00 / 4.1%
  readout "channel"                       1.19 / 0.78 / 253   / 3.11 / 24.3%
  decay "distance" + "channel"            1.05 / 0.70 / 186   / 2.80 / 27.7%
  decay "search" + "channel" (default)    0.96 / 0.66 / 93    / 2.09 / 33.9%  (7 decay candidates: ~7x the cost)
After 24 steps of step 1 (AdamW 1e-3): plain 1.58 / 0.83 / 92k / 9.08 / 2.9%; "channel" 1.03 / 0.69 / 245 / 3.05 / 24.2%;
"distance" + "channel" 0.87 / 0.59 / 150 / 2.52 / 30.5%; "search" + "channel" 0.77 / 0.53 / 49 / 1.41 / 44.4%.
Calibration time, 2 x 512 tokens, 1 thread on a shared 2-core CPU: "distance" 96 s, "search" 367 s.

Everything lands in tensors the released formats already have (rwkv6qwen2: time_decay, q_proj, o_proj; rwkv7qwen2:
g2, ln_x), so the calibrated student saves and loads like any other. Calibrate on training text only, never on the held-out split.

    import calibrate, qrwkv
    student = qrwkv.student_from_teacher(teacher).float()
    report = calibrate.calibrate_student(student, teacher, batches)     # batches: list of (B, T) LongTensor
    print(report["rel_err_before"], report["rel_err_after"])            # per converted layer
    report = calibrate.calibrate_rwkv7(rwkv7_student, teacher, batches)  # an rwkv7 student

Tests: python -m pytest -q test_calibrate.py
"""
import contextlib
import math
import time

import torch

import qrwkv

DECAY_GRID = (-6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0)   # candidate centres of time_decay (log λ, λ = −log w)
RWKV7_DECAY_GRID = (-6.0, -4.0, -2.0, 0.0, 2.0, 4.0)      # candidate centres of w0: λ = e^{-1/2} σ(w0) ≈ 0.0015 ... 0.596


# ----------------------------------------------------------------------------- recording

@torch.no_grad()
def capture_attention_io(teacher: qrwkv.QRWKV, batches, layers) -> dict:
    """Run the teacher on `batches`; for each layer i in `layers` return lists (one entry per batch) of its
    normalised attention input x, RoPE cos/sin, per-head output z (o_proj's input) and output y, in fp32."""
    io = {i: dict(x=[], cos=[], sin=[], z=[], y=[]) for i in layers}
    hooks = []

    def on_attn(i):
        def hook(module, args, out):   # Attention.forward(x, cos, sin, cache) -> (y, cache)
            rec = io[i]
            rec["x"].append(args[0].float()), rec["cos"].append(args[1].float()), rec["sin"].append(args[2].float())
            rec["y"].append(out[0].float())
        return hook

    def on_o_proj(i):
        return lambda module, args: io[i]["z"].append(args[0].float())

    try:
        for i in layers:
            attn = teacher.model.layers[i].self_attn
            hooks.append(attn.register_forward_hook(on_attn(i)))
            hooks.append(attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        for ids in batches:
            teacher(ids.to(next(teacher.parameters()).device), return_hidden=True)
    finally:
        for h in hooks:
            h.remove()
    return io


@contextlib.contextmanager
def wkv_inputs_recorded(rec: list):
    """Inside, every qrwkv.wkv6 call appends its (r, k, v, log_w) to `rec`: the time-mix computes them, so the
    token shift, decay, balancing and N^(-1/2) scale are read from the model, not written a second time here."""
    real = qrwkv.wkv6

    def spy(r, k, v, log_w, *args, **kw):
        rec.append((r.float(), k.float(), v.float(), log_w.float()))
        return real(r, k, v, log_w, *args, **kw)

    qrwkv.wkv6 = spy
    try:
        yield rec
    finally:
        qrwkv.wkv6 = real


@torch.no_grad()
def student_pieces(tm: qrwkv.TimeMix, x, cos, sin):
    """One time-mix forward on teacher-forced input: output y_s, o_proj's input h (the gated mixer output,
    (B, T, H, N)), the recurrence inputs r, k, v, log_w and the output gate g, all (B, T, H, N)."""
    rec, gate, h = [], [], []
    hooks = [tm.gate.register_forward_hook(lambda m, a, out: gate.append(torch.sigmoid(out.float()))),
             tm.o_proj.register_forward_pre_hook(lambda m, a: h.append(a[0].float()))]
    try:
        with wkv_inputs_recorded(rec):
            dt = tm.q_proj.weight.dtype
            y, _ = tm(x.to(dt), cos.to(dt), sin.to(dt), None)
    finally:
        for hook in hooks:
            hook.remove()
    r, k, v, log_w = rec[0]
    return y.float(), h[0].view(r.shape), r, k, v, log_w, gate[0].view(r.shape)


# ----------------------------------------------------------------------------- statistics

@torch.no_grad()
def channel_features(r, k, v, log_w, g):
    """Per-key-channel contributions F (B, T, H, N_key, N_value) to the time-mix output before o_proj:
    S_t = diag(w_t) S_{t-1} + k_tᵀ v_t,  F_t[n, :] = r_t[n] · S_t[n, :] ⊙ g_t,  so  y_t · g_t = Σ_n F_t[n, :]."""
    B, T, H, N = r.shape
    S = r.new_zeros(B, H, N, N)
    F = r.new_empty(B, T, H, N, N)
    w = log_w.exp()
    for t in range(T):
        S = w[:, t, :, :, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        F[:, t] = r[:, t, :, :, None] * S * g[:, t, :, None, :]
    return F


def channel_normal_equations(pieces_and_targets):
    """Least squares of z_h ≈ Σ_n c_hn F_hn over all tokens, per head: G = Σ F Fᵀ (H, N, N), b = Σ F z (H, N),
    zz = Σ ‖z‖² (H,). Input: iterable of ((r, k, v, log_w, g), z) with z (B, T, H·N)."""
    G = b = zz = 0
    for (r, k, v, log_w, g), z in pieces_and_targets:
        F = channel_features(r, k, v, log_w, g)
        zh = z.view(F.shape[:4])
        G = G + torch.einsum("bthnv,bthmv->hnm", F, F)
        b = b + torch.einsum("bthnv,bthv->hn", F, zh)
        zz = zz + zh.pow(2).sum((0, 1, 3))
    return G.double(), b.double(), zz.double()


def ridge_solve(A, rhs, ridge):
    """argmin_c ‖·‖² with normal equations A c = rhs, A regularised by ridge × mean(diag A) (batched over heads)."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype)
    lam = ridge * A.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-30)[..., None, None]
    return torch.linalg.solve(A + lam * eye, rhs.unsqueeze(-1)).squeeze(-1)


def residuals(G, b, zz, per_channel, ridge):
    """Per-head residual ‖z − fit‖² of the best per-channel (or single per-head) readout, and its weights."""
    if per_channel:
        c = ridge_solve(G, b, ridge)
    else:   # one scalar per head: c_hn = a_h for every n
        a = b.sum(-1) / G.sum((-1, -2)).clamp(min=1e-30)
        c = a[:, None].expand_as(b)
    fit = 2 * (c * b).sum(-1) - torch.einsum("hn,hnm,hm->h", c, G, c)
    return zz - fit, c


@torch.no_grad()
def teacher_attention_distance(attn: qrwkv.Attention, x, cos, sin, skip_first=True):
    """Mean distance t − s of each head's softmax attention, averaged over queries t ≥ 1; with skip_first the
    first position (an attention sink in most LLMs: weight without content) is left out and P renormalised."""
    x = x.to(attn.q_proj.weight.dtype)     # the teacher may be bf16; the distances are computed in fp32
    q, k, _ = attn.project(x, x, x)
    q, k = (qrwkv.apply_rope(t.float(), cos.float(), sin.float()).transpose(1, 2) for t in (q, k))
    k = k.repeat_interleave(attn.H // attn.Hk, dim=1)
    T = x.shape[1]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.N)
    pos = torch.arange(T)
    dist = (pos[:, None] - pos[None, :]).float()
    scores = scores.masked_fill(dist < 0, float("-inf"))
    if skip_first:
        scores[..., 1:, 0] = float("-inf")
    P = scores.softmax(-1)
    return (P * dist.clamp(min=0)).sum(-1)[..., 1:].mean((0, 2))    # (H,)


# ----------------------------------------------------------------------------- per-layer calibration

def decay_profile(N, spread):
    """Within a head, channel n's time_decay is centre + spread·(2n/(N−1) − 1): horizons over a factor e^(2·spread)."""
    return spread * (2 * torch.arange(N, dtype=torch.float32) / max(N - 1, 1) - 1)


def set_decay(tm, centres, spread):
    with torch.no_grad():
        d = centres.float()[:, None] + decay_profile(tm.N, spread)[None, :]
        tm.time_decay.copy_(d.reshape(tm.time_decay.shape))


def choose_decay(tm, teacher_attn, rec, mode, spread, per_channel, ridge):
    """Per-head decay centres: "distance" from the teacher's mean attention distance m (a geometric kernel with
    mean distance m has w/(1−w) = m, i.e. λ = −log w = log(1 + 1/m)); "search" the grid centre with the lowest
    least-squares residual on z."""
    if mode == "distance":
        m = torch.stack([teacher_attention_distance(teacher_attn, x, c, s) for x, c, s in zip(rec["x"], rec["cos"], rec["sin"])]).mean(0)
        return torch.log(torch.log1p(1 / m.clamp(min=1e-3)))
    best = None
    for centre in DECAY_GRID:
        set_decay(tm, torch.full((tm.H,), centre), spread)
        res, _ = residuals(*layer_normal_equations(tm, rec), per_channel, ridge)
        best = res[None] if best is None else torch.cat([best, res[None]])
    return torch.tensor(DECAY_GRID)[best.argmin(0)]


def layer_normal_equations(tm, rec):
    pieces = (student_pieces(tm, x, c, s)[2:] for x, c, s in zip(rec["x"], rec["cos"], rec["sin"]))
    return channel_normal_equations(zip(pieces, rec["z"]))


@torch.no_grad()
def gated_outputs(tm, rec):
    """Per batch: the time-mix's gated output before o_proj, per head (B, T, H, N), and the teacher's y minus o_proj's bias."""
    for x, c, s, y in zip(rec["x"], rec["cos"], rec["sin"], rec["y"]):
        yield student_pieces(tm, x, c, s)[1], y - (tm.o_proj.bias.float() if tm.o_proj.bias is not None else 0)


@torch.no_grad()
def fit_head_amplitudes(tm, rec, ridge):
    """α_h minimising Σ_t ‖y_t − Σ_h α_h · W_o[:, h] (g·y_s)_h‖² (features (B, T, H, C)), folded into o_proj's columns."""
    A = rhs = 0
    W = tm.o_proj.weight.float().view(-1, tm.H, tm.N)                      # (C, H, N)
    for h, y0 in gated_outputs(tm, rec):
        u = torch.einsum("bthv,chv->bthc", h, W)
        A = A + torch.einsum("bthc,btgc->hg", u, u).double()
        rhs = rhs + torch.einsum("bthc,btc->h", u, y0).double()
    alpha = ridge_solve(A, rhs, ridge)
    tm.o_proj.weight.mul_(alpha.float().repeat_interleave(tm.N)[None, :].to(tm.o_proj.weight.dtype))
    return alpha


@torch.no_grad()
def ridge_refit_(linear, pairs, ridge):
    """linear.weight ← argmin_W Σ_t ‖y_t − W h_t‖² + ρ‖W − W_0‖² over (h, y) pairs (..., D_in), (..., D_out) with
    the bias already taken off y, ρ = ridge × mean(diag Σ h hᵀ): the normal equations (Σ h hᵀ + ρ I) Wᵀ = Σ h yᵀ + ρ W_0ᵀ."""
    A = rhs = 0
    for h, y0 in pairs:
        h, y0 = h.reshape(-1, h.shape[-1]).double(), y0.reshape(-1, y0.shape[-1]).double()
        A, rhs = A + h.T @ h, rhs + h.T @ y0
    rho = ridge * A.diagonal().mean()
    W = torch.linalg.solve(A + rho * torch.eye(A.shape[0], dtype=A.dtype), rhs + rho * linear.weight.double().T).T
    linear.weight.copy_(W.to(linear.weight.dtype))


def refit_o_proj(tm, rec, ridge):
    """o_proj re-fitted onto the teacher's output y from the gated time-mix output h (ridge_refit_)."""
    ridge_refit_(tm.o_proj, ((h.flatten(2), y0) for h, y0 in gated_outputs(tm, rec)), ridge)


@torch.no_grad()
def relative_error(tm, rec) -> float:
    """‖y_s − y_t‖ / ‖y_t‖ over all recorded tokens (Frobenius), the student layer fed the teacher's input."""
    num = den = 0.0
    for x, c, s, y in zip(rec["x"], rec["cos"], rec["sin"], rec["y"]):
        ys, *_ = student_pieces(tm, x, c, s)
        num, den = num + (ys - y).pow(2).sum().item(), den + y.pow(2).sum().item()
    return math.sqrt(num / max(den, 1e-30))


def calibrate_layer(tm, teacher_attn, rec, decay, readout, refit_o, spread, ridge):
    """Calibrate one time-mix block in place (see the module docstring); returns the chosen decay centres."""
    per_channel = readout == "channel" and not tm.use_rope and not hasattr(tm, "q_norm")
    centres = None
    if decay != "spec":
        centres = choose_decay(tm, teacher_attn, rec, decay, spread, per_channel, ridge)
        set_decay(tm, centres, spread)
    with torch.no_grad():
        if per_channel:     # r_n scales channel n's contribution: fold c_hn into q_proj's row h·N + n
            _, c = residuals(*layer_normal_equations(tm, rec), True, ridge)
            scale = c.float().reshape(-1)
            tm.q_proj.weight.mul_(scale[:, None].to(tm.q_proj.weight.dtype))
            if tm.q_proj.bias is not None:
                tm.q_proj.bias.mul_(scale.to(tm.q_proj.bias.dtype))
        if readout == "gate":   # σ(0) = 0.5 at init: undo it in o_proj
            tm.o_proj.weight.mul_(2.0)
        if readout in ("head", "channel"):
            fit_head_amplitudes(tm, rec, ridge)
        if refit_o:
            refit_o_proj(tm, rec, ridge)
    return centres


def check_fresh(tm: qrwkv.TimeMix, i: int):
    """The closed forms assume the SPEC §3 init: gate weight zero (g = 0.5), token shift and decay LoRA off."""
    fresh = (tm.gate.weight, tm.time_maa_w1, tm.time_decay_w1, tm.time_maa_r, tm.time_maa_k, tm.time_maa_v,
             tm.time_maa_w, tm.time_maa_g)
    if any(p.detach().abs().max() != 0 for p in fresh):
        raise ValueError(f"layer {i}: time-mix is not at its SPEC §3 init (gate / token shift / decay LoRA trained); "
                         f"calibrate a fresh student")


def calibrate_student(student: qrwkv.QRWKV, teacher: qrwkv.QRWKV, batches, decay="search", readout="channel",
                      refit_o=False, spread=1.0, ridge=1e-3) -> dict:
    """Calibrate every time-mix block of `student` (layers not in student.config.attention_layers) in place on the
    teacher's attention over `batches` (list of (B, T) LongTensor, training text). Options: decay "spec" |
    "distance" | "search"; readout "none" | "gate" | "head" | "channel"; refit_o; spread (half-width of a head's
    time_decay range); ridge (relative regularisation of the least squares). Returns a report dict."""
    if decay not in ("spec", "distance", "search") or readout not in ("none", "gate", "head", "channel"):
        raise ValueError(f"calibrate: unknown decay {decay!r} or readout {readout!r}")
    t0 = time.time()
    layers = [i for i in range(student.config.num_hidden_layers) if i not in student.config.attention_layers]
    for i in layers:
        check_fresh(student.model.layers[i].self_attn, i)
    io = capture_attention_io(teacher, batches, layers)
    report = dict(options=dict(decay=decay, readout=readout, refit_o=refit_o, spread=spread, ridge=ridge),
                  layers=layers, tokens=sum(b.numel() for b in batches), rel_err_before=[], rel_err_after=[], decay_centres={})
    for i in layers:
        tm, rec = student.model.layers[i].self_attn, io.pop(i)
        dev = next(tm.parameters()).device
        rec = {key: [t.to(dev) for t in val] for key, val in rec.items()}
        report["rel_err_before"].append(relative_error(tm, rec))
        centres = calibrate_layer(tm, teacher.model.layers[i].self_attn, rec, decay, readout, refit_o, spread, ridge)
        report["rel_err_after"].append(relative_error(tm, rec))
        if centres is not None:
            report["decay_centres"][i] = [round(c, 3) for c in centres.tolist()]
    report["seconds"] = time.time() - t0
    return report


# ----------------------------------------------------------------------------- RWKV-7 (TimeMix7)
# The RWKV-6 closed forms above read that mixer's gate, token shift and wkv6 inputs.  The RWKV-7 student (RoPE on r,
# per-head GroupNorm) has no per-key-channel readout to fold, so its calibrated init fits the mixer's output
# amplitude instead, channel by channel, at o_proj's input:
#   1. the low-rank gate g = σ(x g1) g2 starts (g1 = 0) as 0.5 · column sums of g2: ~0.02 with a random sign per
#      channel; g2 is shifted per column so that g = 1 (its orthogonal part is kept, so g1 still learns);
#   2. with h the student's o_proj input and z the teacher's (per-head attention output), each layer fed the
#      teacher's normalised input:  z_c ≈ s_c h_c + β_c  by ridge least squares per channel c,
#          s_c = cov(h_c, z_c) / (var(h_c) + ρ),  β_c = mean(z_c) − s_c mean(h_c),  ρ = ridge · mean_c var(h_c),
#      folded into the GroupNorm affine (ln_x.weight ← s ⊙ ln_x.weight, ln_x.bias ← s ⊙ ln_x.bias + β / g), or
#      without GroupNorm s into o_proj's columns (no intercept: o_proj has no bias);
#   3. decay="search" (the default, convert.py's --calibrate_decay search), before 2.: each head's w0 centre is the
#      point of RWKV7_DECAY_GRID (channels spread ±1 around it) whose fit 2. leaves the least residual on the first
#      search_batches batches.
# Demo teacher (SmolLM2-135M, 4 x 512 held-out tokens, 4 x 512 calibration tokens): step-0 perplexity ratio 2,311x
# (SPEC init) -> 24x, median per-layer relative error 1.00 -> 0.83 (the gate shift alone: 3.3, 130,000x).  Whole
# demo runs (convert.py --student rwkv7 --steps2 100, 16 x 512 calibration tokens), SPEC w0 -> search: step 0
# 22.3x -> 9.3x, after step 1 9.1x -> 3.3x, done 2.15x -> 1.42x, for no measurable calibration time (2 search batches).
# Tried before and not kept: re-fitting all of o_proj by ridge regression (ridge_refit_, 16 x 512 tokens) reached
# 11.1x at step 0 and 10.6x after step 1, but its o_proj had ~3.4x the teacher's norm, step 2 rose (train KL
# 4.0 -> 5.8) and ended at 90x against 3.42x uncalibrated.

@torch.no_grad()
def rwkv7_outputs(student: qrwkv.QRWKV, io: dict, i: int, batches=None):
    """Per recorded batch: (y_s, h, y) -- student layer i's output and o_proj input, fed the teacher's normalised
    input, and the teacher's output.  Layer 0 runs first on its own recorded input, so the value residual of layer i
    sees v_first of the same tokens."""
    tm, tm0 = student.model.layers[i].self_attn, student.model.layers[0].self_attn
    for b in range(len(io[i]["x"]))[:batches]:
        h = []
        tm0(io[0]["x"][b], io[0]["cos"][b], io[0]["sin"][b], None)
        hook = tm.o_proj.register_forward_pre_hook(lambda m, a: h.append(a[0].float()))
        try:
            y_s, _ = tm(io[i]["x"][b], io[i]["cos"][b], io[i]["sin"][b], None)
        finally:
            hook.remove()
        yield y_s.float(), h[0], io[i]["y"][b]


def rwkv7_relative_error(student, io, i) -> float:
    """‖y_s − y_t‖ / ‖y_t‖ of layer i over the recorded tokens (as relative_error, for TimeMix7)."""
    num = den = 0.0
    for y_s, _, y in rwkv7_outputs(student, io, i):
        num, den = num + (y_s - y).pow(2).sum().item(), den + y.pow(2).sum().item()
    return math.sqrt(num / max(den, 1e-30))


def unit_gate_(tm: qrwkv.TimeMix7):
    """Shift g2 per column so that the fresh low-rank gate 0.5 · 1ᵀ g2 is 1; returns the constant gate (D,) in fp64
    (type 1: σ(0) = 0.5 everywhere).  Refuses a trained gate, whose value is no longer a constant."""
    if tm.gate_rank_type == 1:
        if tm.gate.weight.abs().max() != 0:
            raise ValueError(f"layer {tm.layer_id}: the gate is trained (not at its SPEC init); calibrate a fresh student")
        return torch.full((tm.H * tm.N,), 0.5, dtype=torch.float64, device=tm.gate.weight.device)
    if tm.g1.abs().max() != 0:
        raise ValueError(f"layer {tm.layer_id}: the gate is trained (g1 != 0, not at its SPEC init); calibrate a fresh student")
    tm.g2.add_((2 - tm.g2.sum(0, keepdim=True)) / tm.g2.shape[0])
    return torch.ones(tm.g2.shape[1], dtype=torch.float64, device=tm.g2.device)


def channel_affine(pairs, ridge, intercept=True):
    """(s, β, residual) of the per-channel ridge least squares z_c ≈ s_c h_c + β_c over (h, z) pairs (..., D) (see
    above), the residual sum of squares per channel; intercept=False fits z_c ≈ s_c h_c (β = 0: uncentred moments)."""
    n = sh = sz = shh = shz = szz = 0
    for h, z in pairs:
        h, z = h.reshape(-1, h.shape[-1]).double(), z.reshape(-1, z.shape[-1]).double()
        n, sh, sz = n + h.shape[0], sh + h.sum(0), sz + z.sum(0)
        shh, shz, szz = shh + (h * h).sum(0), shz + (h * z).sum(0), szz + (z * z).sum(0)
    mh, mz = (sh / n, sz / n) if intercept else (0, 0)
    var_h, cov, var_z = shh / n - mh * mh, shz / n - mh * mz, szz / n - mz * mz
    s = cov / (var_h + ridge * var_h.mean())
    return s, mz - s * mh, n * (var_z - 2 * s * cov + s * s * var_h)   # s, β, Σ_t (z − s h − β)² per channel


def affine_pairs(student, io, i, batches=None):
    """(h, z) per recorded batch (the first `batches`): student layer i's o_proj input and the teacher's."""
    return ((h, z) for (_, h, _), z in zip(rwkv7_outputs(student, io, i, batches), io[i]["z"]))


def choose_w0(student, io, i, ridge, batches):
    """Per head of layer i, the w0 centre on RWKV7_DECAY_GRID (channels spread ±1 around it, decay_profile) whose
    per-channel affine fit of z has the lowest residual on the first `batches` recorded batches; sets w0."""
    tm = student.model.layers[i].self_attn
    set_w0 = lambda c: tm.w0.copy_((c[:, None] + decay_profile(tm.N, 1.0)).reshape(tm.w0.shape))
    rss = []
    for centre in RWKV7_DECAY_GRID:
        set_w0(torch.full((tm.H,), centre))
        rss.append(channel_affine(affine_pairs(student, io, i, batches), ridge, intercept=hasattr(tm, "ln_x"))[2].view(tm.H, tm.N).sum(-1))
    set_w0(torch.tensor(RWKV7_DECAY_GRID)[torch.stack(rss).argmin(0)])


@torch.no_grad()
def calibrate_rwkv7(student: qrwkv.QRWKV, teacher: qrwkv.QRWKV, batches, decay="search", ridge=1e-2, search_batches=2) -> dict:
    """Calibrate every TimeMix7 of an rwkv7 `student` in place (see above: unit gate, per-channel output affine) on
    the teacher's attention over `batches` (list of (B, T) LongTensor, training text).  Returns a report like
    calibrate_student's."""
    if decay not in ("spec", "search"):
        raise ValueError(f"calibrate_rwkv7: decay must be 'spec' or 'search', got {decay!r}")
    t0 = time.time()
    layers = [i for i in range(student.config.num_hidden_layers) if i not in student.config.attention_layers]
    if not all(isinstance(student.model.layers[i].self_attn, qrwkv.TimeMix7) for i in layers):
        raise ValueError("calibrate_rwkv7: the student is not an rwkv7 (TimeMix7) model; use calibrate_student")
    dev = next(student.parameters()).device
    io = {i: {k: [t.to(dev) for t in v] for k, v in rec.items()} for i, rec in capture_attention_io(teacher, batches, layers).items()}
    report = dict(options=dict(decay=decay, readout="channel_affine", ridge=ridge), layers=layers,
                  tokens=sum(b.numel() for b in batches), rel_err_before=[], rel_err_after=[])
    for i in layers:   # ln_x, g2 and o_proj of a layer do not reach v_first, so the order does not matter
        tm = student.model.layers[i].self_attn
        report["rel_err_before"].append(rwkv7_relative_error(student, io, i))
        g = unit_gate_(tm)
        if decay == "search":
            choose_w0(student, io, i, ridge, search_batches)
        s, beta, _ = channel_affine(affine_pairs(student, io, i), ridge, intercept=hasattr(tm, "ln_x"))   # o_proj has no bias to take β
        if hasattr(tm, "ln_x"):
            tm.ln_x.bias.copy_((s * tm.ln_x.bias.double() + beta / g).to(tm.ln_x.bias.dtype))
            tm.ln_x.weight.mul_(s.to(tm.ln_x.weight.dtype))
        else:
            tm.o_proj.weight.mul_(s.to(tm.o_proj.weight.dtype))
        report["rel_err_after"].append(rwkv7_relative_error(student, io, i))
    report["seconds"] = time.time() - t0
    return report
