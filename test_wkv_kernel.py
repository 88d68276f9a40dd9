"""Tests of wkv_kernel.wkv6 against an fp64 sequential reference, a plain-numpy per-token oracle and
the `rwkv` pip package (0.8.x, x060 time-mix on CPU).   python -m pytest test_wkv_kernel.py"""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import wkv_kernel
from wkv_kernel import wkv6

BACKENDS = ["sequential", "chunked"] + (["cuda"] if torch.cuda.is_available() else [])
FORMS = ["qrwkv", "classic"]
B, H, N = 2, 3, 16


def make(T, raw=(-4.0, 1.6), seed=0, b=B, h=H, n=N):
    """fp64 inputs (r, k, v, log_w, u, state); log_w = -exp(raw), raw ~ U(raw)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    r, k, v = (0.5 * rnd(b, T, h, n) for _ in range(3))
    lo, hi = raw
    log_w = -(lo + (hi - lo) * torch.rand(b, T, h, n, generator=g, dtype=torch.float64)).exp()
    return r, k, v, log_w, rnd(h, n), 0.5 * rnd(b, h, n, n)


def run(backend, r, k, v, log_w, u=None, state=None, **kw):
    """wkv6 on the backend's device; fp32 inputs unless they are bf16 already; results on CPU."""
    dev = "cuda" if backend == "cuda" else "cpu"
    cast = lambda x: None if x is None else x.to(dev, torch.float32 if x.dtype == torch.float64 else x.dtype)
    y, S = wkv6(cast(r), cast(k), cast(v), cast(log_w), cast(u), cast(state), backend=backend, **kw)
    return y.cpu(), S.cpu()


def oracle(r, k, v, log_w, u=None, state=None):
    """fp64 sequential reference."""
    return wkv6(r, k, v, log_w, u, state, backend="sequential")


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 63, 64, 65, 131, 257])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_fp64_oracle(backend, form, T):
    r, k, v, log_w, u, S0 = make(T, seed=T)
    u = u if form == "classic" else None
    y_ref, S_ref = oracle(r, k, v, log_w, u, S0)
    y, S = run(backend, r, k, v, log_w, u, S0)
    assert y.dtype == torch.float32 and S.dtype == torch.float32
    close(y, y_ref)
    close(S, S_ref)


def numpy_wkv6(r, k, v, w, u, S):
    """Per token, straight from the formulas (one batch, one head; S[key, value]):
    classic y_t = r_t S_{t-1} + (r_t*u . k_t) v_t;  QRWKV6 y_t = r_t S_t;  S_t = diag(w_t) S_{t-1} + k_t^T v_t."""
    y = np.zeros_like(v)
    for t in range(len(r)):
        kv = np.outer(k[t], v[t])
        if u is not None:
            y[t] = r[t] @ S + (r[t] * u) @ k[t] * v[t]
        S = w[t][:, None] * S + kv
        if u is None:
            y[t] = r[t] @ S
    return y, S


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_numpy_oracle(backend, form):
    r, k, v, log_w, u, S0 = make(40, seed=1)
    u = u if form == "classic" else None
    y, S = wkv6(r, k, v, log_w, u, S0, backend=backend, chunk_size=16)
    w = log_w.exp().numpy()
    for b in range(B):
        for h in range(H):
            yn, Sn = numpy_wkv6(r[b, :, h].numpy(), k[b, :, h].numpy(), v[b, :, h].numpy(), w[b, :, h],
                                None if u is None else u[h].numpy(), S0[b, h].numpy())
            np.testing.assert_allclose(y[b, :, h].numpy(), yn, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(S[b, h].numpy(), Sn, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("raw", [(-4.0, 1.6), (-6.0, -2.0)])  # the second: weak decays, chunks as asked
@pytest.mark.parametrize("L", [2, 5, 16, 32, 64])
@pytest.mark.parametrize("form", FORMS)
def test_chunk_size_invariance(form, L, raw):
    r, k, v, log_w, u, S0 = make(131, raw=raw, seed=2)
    u = u if form == "classic" else None
    y_ref, S_ref = oracle(r, k, v, log_w, u, S0)
    y, S = wkv6(r, k, v, log_w, u, S0, backend="chunked", chunk_size=L)  # fp64: exact
    close(y, y_ref, 1e-11)
    close(S, S_ref, 1e-11)
    y, S = run("chunked", r, k, v, log_w, u, S0, chunk_size=L)
    close(y, y_ref)
    close(S, S_ref)


@pytest.mark.parametrize("a", [1, 17, 64, 100])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_carry(backend, form, a):
    r, k, v, log_w, u, S0 = make(131, seed=3)
    u = u if form == "classic" else None
    y, S = run(backend, r, k, v, log_w, u, S0)
    y1, S1 = run(backend, r[:, :a], k[:, :a], v[:, :a], log_w[:, :a], u, S0)
    y2, S2 = run(backend, r[:, a:], k[:, a:], v[:, a:], log_w[:, a:], u, S1)
    close(torch.cat([y1, y2], 1), y, 1e-5)
    close(S2, S, 1e-5)


def loss_and_grads(backend, inputs, gy, gS, dtype):
    """Gradients of <y, gy> + <S_T, gS> (the final state is in the loss) w.r.t. all inputs (None: absent)."""
    xs = [None if x is None else x.to(dtype).requires_grad_() for x in inputs]
    y, S = wkv6(*xs, backend=backend)
    ((y * gy.to(dtype)).sum() + (S * gS.to(dtype)).sum()).backward()
    return [x.grad for x in xs if x is not None]


@pytest.mark.parametrize("group", [None, 1, 3])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_vs_fp64_autograd(backend, form, group, monkeypatch):
    """All gradients against autograd through the fp64 loop; `group`: chunks per _Chunked call (150 tokens are 10
    chunks of 16: in groups of 1 and of 3, the state carried between calls), None = the default grouping."""
    if group:
        monkeypatch.setattr(wkv_kernel, "GROUP_ELEMS", group * B * H * 16 * N)
    r, k, v, log_w, u, S0 = make(150, seed=4)
    inputs = (r, k, v, log_w, u if form == "classic" else None, S0)
    inputs, keep = [x for x in inputs if x is not None], [x is not None for x in inputs]
    gy, gS = torch.randn_like(r), torch.randn_like(S0)

    def grads(be, dtype):
        xs = iter(x.to(dtype).requires_grad_() for x in inputs)
        args = [next(xs) if kept else None for kept in keep]
        if be == "cuda":  # needs grad -> runs the chunked path on the GPU
            args = [None if x is None else x.detach().cuda().requires_grad_() for x in args]
        y, S = wkv6(*args, backend=be)
        ((y * gy.to(y)).sum() + (S * gS.to(S)).sum()).backward()
        return [x.grad.cpu() for x in args if x is not None]

    for g, g_ref in zip(grads(backend, torch.float32), grads("sequential", torch.float64)):
        close(g, g_ref, 1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_chunked_fp64(form):
    r, k, v, log_w, u, S0 = make(19, seed=5, b=1, h=2, n=4)
    u = u if form == "classic" else None
    xs = [x.requires_grad_() for x in (r, k, v, log_w, u, S0) if x is not None]

    def f(*xs):
        xs = list(xs)
        args = xs[:4] + ([xs.pop(4)] if form == "classic" else [None]) + xs[4:]
        return wkv6(*args, backend="chunked", chunk_size=8)

    assert torch.autograd.gradcheck(f, xs, fast_mode=True)


@pytest.mark.parametrize("raw", [(3.0, 6.0), (-25.0, -15.0)])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_decays(backend, form, raw):
    """raw in [3, 6]: log_w down to -exp(6) ~ -403 (not clamped); raw in [-25, -15]: log_w ~ -1e-11,
    where exp(-exp(raw)) is 1.0 in fp32.  Outputs, state and gradients finite and exact."""
    r, k, v, log_w, u, S0 = make(200, raw=raw, seed=6)
    u = u if form == "classic" else None
    y_ref, S_ref = oracle(r, k, v, log_w, u, S0)
    y, S = run(backend, r, k, v, log_w, u, S0)
    scale = y_ref.abs().max()
    close(y / scale, y_ref / scale)
    close(S / S_ref.abs().max(), S_ref / S_ref.abs().max())
    if backend != "cuda":
        xs = [x.float().requires_grad_() for x in (r, k, v, log_w)]
        y, S = wkv6(*xs, u, S0.float(), backend=backend)
        (y.square().mean() + S.square().mean()).backward()
        assert all(torch.isfinite(x.grad).all() for x in xs)


def test_chunk_len_keeps_factors_in_range():
    """The chunk is used as asked while L · max(-log_w) <= 80 (fp32), else shortened to fit; under 2 tokens
    the sequential loop runs.  QRWKV6's clamp log_w >= -5 always gets the default 16."""
    lw = lambda strongest: torch.tensor([-0.1, -strongest])
    assert wkv_kernel._wkv6_chunk_len(lw(5.0), 16, torch.float32) == 16
    assert wkv_kernel._wkv6_chunk_len(lw(0.5), 64, torch.float32) == 64
    assert wkv_kernel._wkv6_chunk_len(lw(12.0), 16, torch.float32) == 6
    assert wkv_kernel._wkv6_chunk_len(lw(403.0), 16, torch.float32) == 0
    assert wkv_kernel._wkv6_chunk_len(lw(12.0), 64, torch.float64) == 50


@pytest.mark.parametrize("form", FORMS)
def test_strong_decays_shortened_chunks(form):
    """log_w in [-12.2, -4.5]: chunks of 6 instead of 16; exact against the oracle, gradients included."""
    r, k, v, log_w, u, S0 = make(100, raw=(1.5, 2.5), seed=12)
    u = u if form == "classic" else None
    assert wkv_kernel._wkv6_chunk_len(log_w, 16, torch.float32) == 6
    y_ref, S_ref = oracle(r, k, v, log_w, u, S0)
    y, S = run("chunked", r, k, v, log_w, u, S0)
    close(y, y_ref)
    close(S, S_ref)
    gy, gS = torch.randn_like(r), torch.randn_like(S0)
    grads = [loss_and_grads(be, (r, k, v, log_w, u, S0), gy, gS, dt)
             for be, dt in (("chunked", torch.float32), ("sequential", torch.float64))]
    for g, g_ref in zip(*grads):
        close(g, g_ref, 1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_overflowing_masked_products(form):
    """log_w = -5 everywhere: chunk span exactly 80, factors e^{±40}; with |r|, |k| ~ 1000 the products above
    the diagonal of q κᵀ overflow: (q κᵀ)_ij = (r_i · k_j) e^{c_i - c_j} = (r_i · k_j) e^{5 (j - i)} for j > i,
    beyond fp32's 3.4e38.  tril discards them: y, S and every gradient finite and equal to the fp64 oracle's."""
    r, k, v, _, u, S0 = make(64, seed=13)
    r, k, log_w = 2000 * r, 2000 * k, torch.full_like(r, -5.0)
    u = u if form == "classic" else None
    i = torch.arange(16)
    above = (r[0, :16, 0] @ k[0, :16, 0].T) * torch.exp(5.0 * (i[None] - i[:, None])) * (i[None] > i[:, None])
    assert above.abs().max() > 3.4e38  # the premise: the first chunk's masked products overflow in fp32
    y_ref, S_ref = oracle(r, k, v, log_w, u, S0)
    y, S = run("chunked", r, k, v, log_w, u, S0)
    close(y / y_ref.abs().max(), y_ref / y_ref.abs().max())
    close(S / S_ref.abs().max(), S_ref / S_ref.abs().max())
    gy, gS = torch.randn_like(r), torch.randn_like(S0)
    grads = [loss_and_grads(be, (r, k, v, log_w, u, S0), gy, gS, dt)
             for be, dt in (("chunked", torch.float32), ("sequential", torch.float64))]
    for g, g_ref in zip(*grads):
        assert torch.isfinite(g).all()
        close(g / g_ref.abs().max(), g_ref / g_ref.abs().max(), 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_u_only_changes_diagonal_term(backend):
    r, k, v, log_w, u, S0 = make(70, seed=7)
    u2 = u + torch.randn_like(u)
    y1, S1 = run(backend, r, k, v, log_w, u, S0)
    y2, S2 = run(backend, r, k, v, log_w, u2, S0)
    diag = ((r * (u2 - u)) * k).sum(-1, keepdim=True) * v  # Δy_t = (r_t ⊙ Δu · k_t) v_t
    close(y2 - y1, diag)
    assert torch.equal(S1, S2)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_and_head_independence(backend, form):
    r, k, v, log_w, u, S0 = make(80, seed=8)  # a different initial state per (batch, head)
    u = u if form == "classic" else None
    y, S = run(backend, r, k, v, log_w, u, S0)
    for b in range(B):
        for h in range(H):
            sl = lambda x: x[b:b + 1, :, h:h + 1]
            yb, Sb = run(backend, sl(r), sl(k), sl(v), sl(log_w), None if u is None else u[h:h + 1],
                         S0[b:b + 1, h:h + 1])
            close(yb, sl(y), 1e-6)
            close(Sb, S[b:b + 1, h:h + 1], 1e-6)


@pytest.mark.parametrize("T", [1, 3, 70])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_is_key_by_value(backend, T):
    """A key<->value transpose of the state is caught: with a non-symmetric initial state, no decay
    and k = 0, y_t = r_t · S0 reads row r of S0; one token k = e_1, v = e_2 writes S[1, 2] only."""
    S0 = torch.arange(N * N, dtype=torch.float64).view(1, 1, N, N).expand(B, H, N, N) / N ** 2
    r = torch.zeros(B, T, H, N, dtype=torch.float64)
    r[..., 3] = 1.0
    zero = torch.zeros_like(r)
    y, S = run(backend, r, zero, zero, zero, None, S0)
    close(y, S0[:, None, :, 3, :].expand(B, T, H, N), 1e-7)
    k, v = zero.clone(), zero.clone()
    k[:, -1, :, 1], v[:, -1, :, 2] = 1.0, 1.0
    _, S = run(backend, zero, k, v, zero, None, torch.zeros_like(S0))
    expected = torch.zeros(B, H, N, N)
    expected[:, :, 1, 2] = 1.0
    assert torch.equal(S, expected)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend, form):
    r, k, v, log_w, u, S0 = make(100, seed=9)
    u = u if form == "classic" else None
    bf = lambda x: x.to(torch.bfloat16)
    y, S = run(backend, bf(r), bf(k), bf(v), log_w, u, S0)
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32
    y32, S32 = run(backend, bf(r).float(), bf(k).float(), bf(v).float(), log_w, u, S0)
    close(y.float(), y32, 1e-2)
    close(S, S32, 1e-5)


def test_cuda_request_never_crashes(capfd):
    """backend="cuda" on CPU tensors (or without a GPU / compiler): the chunked result, at most one notice."""
    r, k, v, log_w, u, S0 = make(33, seed=10)
    y_ref, S_ref = oracle(r, k, v, log_w, None, S0)
    for _ in range(2):
        y, S = run("chunked", r, k, v, log_w, None, S0)
        y2, S2 = wkv6(r.float(), k.float(), v.float(), log_w.float(), None, S0.float(), backend="cuda")
        close(y2, y_ref)
        close(S2, S_ref)
    assert len(capfd.readouterr().err.strip().splitlines()) <= 1


def test_bad_arguments():
    r, k, v, log_w, _, _ = make(4)
    with pytest.raises(ValueError):
        wkv6(r, k, v[:, :3], log_w)
    with pytest.raises(ValueError):
        wkv6(r, k, v, log_w, backend="triton")


def test_rwkv_package_x060_oracle():
    """Classic form against the rwkv package's x060 time-mix (CPU, no JIT) with random weights: maa
    and token-shift LoRA are zero, so every branch sees xx = LayerNorm(x); the rest is rebuilt here."""
    os.environ["RWKV_JIT_ON"], os.environ["RWKV_CUDA_ON"] = "0", "0"
    from rwkv.model import RWKV

    T, h, n, R = 37, 2, 8, 4
    C = h * n
    g = torch.Generator().manual_seed(11)
    rnd = lambda *s, scale=1.0: scale * torch.randn(*s, generator=g)
    x, sx, s0 = rnd(T, C), rnd(C), rnd(h, n, n, scale=0.5)
    ln_w, ln_b, lx_w, lx_b = 1 + rnd(C, scale=0.1), rnd(C, scale=0.1), 1 + rnd(C, scale=0.1), rnd(C, scale=0.1)
    zeros = torch.zeros(C)
    tm_w1, tm_w2 = torch.zeros(C, 5 * R), rnd(5, R, C, scale=0.1)
    td_w1, td_w2 = rnd(C, R, scale=0.3), rnd(R, C, scale=0.3)
    t_decay, t_first = -4 + 5 * torch.rand(h, n, generator=g), rnd(h, n, 1)
    kw, vw, rw, gw, ow = (rnd(C, C, scale=C ** -0.5) for _ in range(5))
    out_pkg, _, S_pkg = RWKV.att_seq_v6_0(None, x, sx, s0, ln_w, ln_b, lx_w, lx_b, zeros, zeros, zeros, zeros,
                                          zeros, zeros, tm_w1, tm_w2, td_w1, td_w2, t_decay, t_first,
                                          kw, vw, rw, gw, ow, *[None] * 20)

    xx = F.layer_norm(x, (C,), ln_w, ln_b)
    r, k, v = ((xx @ wt).view(1, T, h, n) for wt in (rw, kw, vw))
    log_w = -(t_decay.flatten() + torch.tanh(xx @ td_w1) @ td_w2).exp().view(1, T, h, n)
    for backend in ("sequential", "chunked"):
        y, S = wkv6(r, k, v, log_w, t_first.view(h, n), s0[None], backend=backend)
        out = F.group_norm(y.reshape(T, C), h, lx_w, lx_b, eps=64e-5) * F.silu(xx @ gw) @ ow
        close(x + out, out_pkg, 1e-4)
        close(S[0], S_pkg, 1e-5)


@pytest.mark.parametrize("form", FORMS)
def test_autocast_does_not_reach_the_recurrence(form):
    """convert.py runs the student under bf16 autocast: wkv6 (forward and its custom backward, which runs under the
    caller's autocast state) must still do fp32 math, giving what it gives without autocast."""
    r, k, v, log_w, u, S0 = (x.float().requires_grad_() for x in make(70, seed=11))
    u = u if form == "classic" else None
    def out_and_grads(autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, S = wkv6(r, k, v, log_w, u, S0)
            loss = (y * torch.linspace(-1, 1, y.shape[-1])).sum() + S.square().sum()
        grads = torch.autograd.grad(loss, [x for x in (r, k, v, log_w, u, S0) if x is not None])
        return [y, S, *grads]
    for a, b in zip(out_and_grads(True), out_and_grads(False)):
        assert a.dtype == torch.float32
        close(a, b, 1e-6)
