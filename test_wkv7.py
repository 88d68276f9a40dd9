"""Tests of wkv_kernel.wkv7 (the RWKV-7 recurrence of the rwkv7qwen2 student) against the fp64 sequential
reference and a plain-numpy per-token oracle written from the formula.   python -m pytest -q test_wkv7.py"""
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import wkv_kernel
from wkv_kernel import wkv7

B, H, N = 2, 3, 16
CHUNK = inspect.signature(wkv7).parameters["chunk_size"].default  # the default path is tested
BACKENDS = ["chunked"] + (["cuda"] if torch.cuda.is_available() else [])   # the default path, and the kernel on GPUs
MAX_LOG_W = math.exp(-0.5)  # RAD-RWKV7: log w = -e^{-1/2} σ(z) ∈ (-0.6065, 0)


def make(T, seed=0, b=B, h=H, n=N, log_w=None, iclr=None):
    """fp64 inputs (r, k, v, log_w, a, b, state) of the released parameterisation: log_w ∈ (-0.6065, 0),
    a = -κ̂, b = κ̂ ⊙ iclr with κ̂ a unit key per head and iclr ∈ (0, 1); state random."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    r, k, v = (0.5 * rnd(b, T, h, n) for _ in range(3))
    if log_w is None:
        log_w = -MAX_LOG_W * torch.sigmoid(2 * rnd(b, T, h, n))
    if iclr is None:
        iclr = torch.sigmoid(2 * rnd(b, T, h, n))
    kk = F.normalize(rnd(b, T, h, n), dim=-1)
    return r, k, v, log_w.expand(b, T, h, n), -kk, kk * iclr, 0.5 * rnd(b, h, n, n)


def oracle(*xs):
    """fp64 sequential reference."""
    return wkv7(*xs, backend="sequential")


def fp32(xs):
    return [x.float() for x in xs]


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 3, 257])
def test_matches_fp64_oracle(T, backend):
    """fp32 outputs and final state; "cuda" (only where a GPU is) on the GPU with a head size the kernel takes."""
    xs = make(T, seed=T, n=32 if backend == "cuda" else N)
    y_ref, S_ref = oracle(*xs)
    dev = "cuda" if backend == "cuda" else "cpu"
    y, S = wkv7(*(x.to(dev) for x in fp32(xs)), backend=backend, chunk_size=CHUNK)
    assert y.dtype == torch.float32 and S.dtype == torch.float32
    if backend == "cuda":
        assert wkv_kernel._cuda["module"] is not None, "the CUDA kernel did not compile"
    close(y.cpu(), y_ref)
    close(S.cpu(), S_ref)


def test_cuda_request_never_crashes(capfd):
    """backend="cuda" on CPU tensors (or without a GPU / compiler): the chunked result, at most one notice."""
    xs = make(33, seed=10)
    y_ref, S_ref = oracle(*xs)
    for _ in range(2):
        y, S = wkv7(*fp32(xs), backend="cuda")
        close(y, y_ref)
        close(S, S_ref)
    assert len(capfd.readouterr().err.strip().splitlines()) <= 1


def numpy_wkv7(r, k, v, w, a, b, S):
    """One batch and head, straight from the formula with explicit matrices, S[key, value]:
    S_t = (diag(w_t) + b_t a_tᵀ) S_{t-1} + k_t v_tᵀ;  y_t = S_tᵀ r_t."""
    y = np.zeros_like(v)
    for t in range(len(r)):
        S = (np.diag(w[t]) + np.outer(b[t], a[t])) @ S + np.outer(k[t], v[t])
        y[t] = S.T @ r[t]
    return y, S


@pytest.mark.parametrize("backend,chunk", [("sequential", 16), ("chunked", 7), ("chunked", 16)])
def test_numpy_oracle(backend, chunk):
    r, k, v, log_w, a, b, S0 = make(40, seed=1)
    y, S = wkv7(r, k, v, log_w, a, b, S0, backend=backend, chunk_size=chunk)
    w = log_w.exp()
    for bi in range(B):
        for h in range(H):
            args = [x[bi, :, h].numpy() for x in (r, k, v, w, a, b)]
            yn, Sn = numpy_wkv7(*args, S0[bi, h].numpy())
            np.testing.assert_allclose(y[bi, :, h].numpy(), yn, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(S[bi, h].numpy(), Sn, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_state_orientation_key_value(backend):
    """Hand-computed, asymmetric: from S0 = 0, token 0 writes k vᵀ with k = e0, v = 2·e1, so S[0, 1] = 2
    ([key, value]); y_0 = S_0ᵀ r reads v·(k·r).  Token 1 (k = v = 0, a = -e0, b = 0.25·e0) removes a
    quarter of key row 0 of the previous state: S_1 = diag(w) S_0 - 0.25 e0 (e0ᵀ S_0).  A key<->value transpose of the state gives other values."""
    z = torch.zeros(1, 2, 1, 4, dtype=torch.float64)
    r, k, v, a, b = z.clone(), z.clone(), z.clone(), z.clone(), z.clone()
    log_w = torch.full_like(z, math.log(0.5))
    k[0, 0, 0, 0], v[0, 0, 0, 1], r[0, 0, 0, 0] = 1.0, 2.0, 3.0
    r[0, 1, 0, 0], a[0, 1, 0, 0], b[0, 1, 0, 0] = 1.0, -1.0, 0.25
    y, S = wkv7(r, k, v, log_w, a, b, backend=backend, chunk_size=2)
    S_expected = torch.zeros(4, 4, dtype=torch.float64)
    S_expected[0, 1] = 2.0 * 0.5 - 0.25 * 2.0  # decayed by w = 0.5, minus a quarter of the previous row
    assert S[0, 0].equal(S_expected)
    assert y[0, 0, 0].tolist() == [0.0, 6.0, 0.0, 0.0]  # v · (k·r) = 2·e1 · 3
    assert y[0, 1, 0].tolist() == [0.0, 0.5, 0.0, 0.0]  # S_1ᵀ e0 = row 0 of S_1


@pytest.mark.parametrize("T,group", [(CHUNK - 1, None), (2 * CHUNK + 3, None), (2 * CHUNK + 3, 1), (4 * CHUNK + 1, 2)])
def test_gradients_match_fp64_autograd(T, group, monkeypatch):
    """Gradients of a loss on y and the final state w.r.t. all six inputs and the initial state: chunked
    (fp64 and fp32) vs autograd through the fp64 sequential loop; also with the chunks run in groups of `group`
    (one _Chunked7 call each, the state carried between calls), which long sequences do."""
    if group:
        monkeypatch.setattr(wkv_kernel, "GROUP_ELEMS", group * B * H * CHUNK * N)
    xs = make(T, seed=3)
    gy = torch.randn(B, T, H, N, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    gS = torch.randn(B, H, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def grads(inputs, backend):
        inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
        y, S = wkv7(*inputs, backend=backend, chunk_size=CHUNK)
        ((y.double() * gy).sum() + (S.double() * gS).sum()).backward()
        return [x.grad for x in inputs]

    ref = grads(xs, "sequential")
    for g64, g32, gr in zip(grads(xs, "chunked"), grads(fp32(xs), "chunked"), ref):
        torch.testing.assert_close(g64, gr, rtol=1e-9, atol=1e-9)
        close(g32, gr, tol=1e-4)


def test_chunk_size_invariance():
    xs = fp32(make(150, seed=6))
    y0, S0 = wkv7(*xs, chunk_size=16)
    for c in (2, 5, 17, 32, 64, 98):
        y, S = wkv7(*xs, chunk_size=c)
        close(y, y0, tol=1e-5)
        close(S, S0, tol=1e-5)


@pytest.mark.parametrize("split", [1, CHUNK, 37])
def test_state_carry(split):
    """wkv7(x[:s]) then wkv7(x[s:], state) equals wkv7(x); and token by token too."""
    xs = fp32(make(70, seed=7))
    y, S = wkv7(*xs)
    y1, S1 = wkv7(*(x[:, :split] for x in xs[:6]), xs[6])
    y2, S2 = wkv7(*(x[:, split:] for x in xs[:6]), S1)
    close(torch.cat([y1, y2], 1), y)
    close(S2, S)
    St, ys = xs[6], []
    for t in range(70):
        yt, St = wkv7(*(x[:, t:t + 1] for x in xs[:6]), St)
        ys.append(yt)
    close(torch.cat(ys, 1), y)
    close(St, S)


@pytest.mark.parametrize("log_w,iclr", [(-1e-7, 1.0), (-MAX_LOG_W, 1.0), (-1e-7, 0.0), (-MAX_LOG_W, 1e-4)])
def test_extreme_released_decays_and_iclr(log_w, iclr):
    """Slowest and fastest decays of the parameterisation with full (iclr = 1: the removal term has an
    eigenvalue 0) or no removal, over 257 tokens: finite, equal to the oracle, finite gradients."""
    xs = make(257, seed=8, log_w=torch.tensor(log_w, dtype=torch.float64),
              iclr=torch.tensor(iclr, dtype=torch.float64))
    y_ref, S_ref = oracle(*xs)
    inputs = [x.float().requires_grad_(True) for x in xs]
    y, S = wkv7(*inputs)
    close(y, y_ref, tol=1e-4)
    close(S, S_ref, tol=1e-4)
    (y.square().mean() + S.square().mean()).backward()
    assert all(torch.isfinite(x.grad).all() for x in inputs)


@pytest.mark.parametrize("lo", [-5.0, -30.0, -400.0])
def test_strong_decays_beyond_the_parameterisation(lo):
    """log_w down to -400 (w underflows): the chunk is shortened so the factorised decays stay finite (or the
    loop runs); results equal the oracle and gradients are finite."""
    g = torch.Generator().manual_seed(9)
    log_w = lo * torch.rand(B, 40, H, N, generator=g, dtype=torch.float64)
    xs = make(40, seed=9, log_w=log_w)
    y_ref, S_ref = oracle(*xs)
    inputs = [x.float().requires_grad_(True) for x in xs]
    y, S = wkv7(*inputs, chunk_size=32)
    close(y, y_ref)
    close(S, S_ref)
    (y.square().mean() + S.square().mean()).backward()
    assert all(torch.isfinite(x.grad).all() for x in inputs)


def test_batch_and_head_independence():
    """Changing batch 1 / head 2's inputs and initial state changes only that slice of y and the state."""
    xs = fp32(make(33, seed=10))
    y, S = wkv7(*xs)
    ys = [x.clone() for x in xs]
    for x in ys[:3] + ys[4:6]:
        x[1, :, 2] = torch.randn_like(x[1, :, 2])
    ys[6][1, 2] += 1.0
    y2, S2 = wkv7(*ys)
    keep = torch.ones(B, H, dtype=torch.bool)
    keep[1, 2] = False
    assert y2.transpose(1, 2)[keep].equal(y.transpose(1, 2)[keep]) and S2[keep].equal(S[keep])
    assert not y2[1, :, 2].equal(y[1, :, 2])


def test_low_precision_inputs_keep_fp32_state():
    xs = make(40, seed=11)
    y_ref, S_ref = oracle(*xs)
    y, S = wkv7(*(x.bfloat16() for x in xs[:3]), xs[3].float(), *(x.bfloat16() for x in xs[4:6]), xs[6].float())
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32
    close(y, y_ref, tol=0.1)
    close(S, S_ref, tol=0.1)


def test_bad_shapes_raise():
    xs = fp32(make(8))
    with pytest.raises(ValueError, match="share one"):
        wkv7(xs[0], xs[1][:, :4], *xs[2:6])
    with pytest.raises(ValueError, match="backend"):
        wkv7(*xs[:6], backend="triton")


def test_autocast_does_not_reach_the_recurrence():
    """Under the student's bf16 autocast, wkv7's chunked matmuls (solve, WY products) must stay fp32."""
    xs = [x.float().requires_grad_() for x in make(70, seed=12)]
    def out_and_grads(autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, S = wkv7(*xs)
            loss = (y * torch.linspace(-1, 1, y.shape[-1])).sum() + S.square().sum()
        return [y, S, *torch.autograd.grad(loss, xs)]
    for a, b in zip(out_and_grads(True), out_and_grads(False)):
        assert a.dtype == torch.float32
        close(a, b, 1e-6)
