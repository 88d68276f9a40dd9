"""WKV6: the RWKV-6 linear-attention recurrence, as one operator with three backends.

Per batch and head, with a state S of shape (N, N) indexed [key, value] and per-channel decay
w_t = exp(log_w_t) in (0, 1]:

    S_t = diag(w_t) · S_{t-1} + k_tᵀ v_t

    u is None (QRWKV6, `rwkv6qwen2`):  y_t = r_t · S_t = (r_t ⊙ w_t) · S_{t-1} + (r_t · k_t) v_t
    u given   (classic RWKV-6):        y_t = r_t · S_{t-1} + (r_t ⊙ u · k_t) v_t

There is no N^(-1/2) factor in here: the QRWKV6 model scales r itself before calling wkv6.

    wkv6(r, k, v, log_w, u=None, state=None, backend=None, chunk_size=16)
        -> (y, new_state)

r, k, v, log_w: (B, T, H, N).  log_w <= 0, fp32, computed by the caller straight from the raw decay
(log_w = -exp(raw), clamped); never log(w), which rounds to log(1.0) = 0 for raw < -17.
u: (H, N).  state: (B, H, N, N) fp32, None = zeros.  y has r's dtype, new_state is fp32 (fp64 for
fp64 inputs); all accumulation is fp32 or wider.

Backends:
  "sequential"  per-token loop; the test oracle (also runs in fp64).
  "chunked"     exact and stable chunked form (SPEC §4; factorised decays, below), autograd, O(T)
                saved memory.  Default on CPU.
  "cuda"        compiled CUDA/HIP kernel, forward only: used when no gradient is needed (inference);
                when autograd needs gradients the chunked path runs instead.  No GPU, no compiler or a
                failed compile -> one notice on stderr, then the chunked path.
backend=None: "cuda" for GPU tensors when the kernel compiled, else "chunked".  T == 1 (decoding) is
a direct one-step update in every torch backend.

    python -m pytest test_wkv_kernel.py
    python bench.py --only kernel
"""
import hashlib
import os
import sys
import time

import torch
import torch.nn.functional as F

BACKENDS = ("sequential", "chunked", "cuda")


# ---------------------------------------------------------------------------------------------
# One step and the sequential oracle
# ---------------------------------------------------------------------------------------------

def _step(r, k, v, w, u, S):
    """One token, (B, H, N) vectors, S (B, H, N, N):
    S' = diag(w) S + kᵀv;  y = r·S' (u None) or y = r·(S + diag(u) kᵀv) (classic)."""
    kv = k.unsqueeze(-1) * v.unsqueeze(-2)
    S_new = torch.addcmul(kv, w.unsqueeze(-1), S)
    read = S_new if u is None else torch.addcmul(S, u.unsqueeze(-1), kv)
    return (r.unsqueeze(-2) @ read).squeeze(-2), S_new


def _wkv6_sequential(r, k, v, log_w, u, S):
    """The recurrence token by token, in S's dtype: y_t, S_t = step(r_t, k_t, v_t, w_t, S_{t-1})."""
    dt = S.dtype
    r, k, v, w = r.to(dt), k.to(dt), v.to(dt), log_w.to(dt).exp()
    u = None if u is None else u.to(dt)
    ys = []
    for t in range(r.shape[1]):
        y, S = _step(r[:, t], k[:, t], v[:, t], w[:, t], u, S)
        ys.append(y)
    return torch.stack(ys, 1), S


# ---------------------------------------------------------------------------------------------
# Chunked form.  Inside a chunk of L tokens, c_i = Σ_{j<=i} log_w_j restarts at the chunk start,
# and the decay seen by the query is g_i = c_i (QRWKV6: r⊙w_t reads S_{t-1}) or c_{i-1} (classic):
#   y_i = (r_i ⊙ e^{g_i}) · S0 + Σ_{j<i} Σ_n r_in k_jn e^{g_in - c_jn} v_j + (b_i · k_i) v_i
# with b = r (QRWKV6) or r ⊙ u (classic).  The pair decays are factorised around the chunk's
# midpoint m = c_last / 2:  e^{g_in - c_jn} = e^{g_in - m_n} · e^{m_n - c_jn}, so with
#   q = r ⊙ e^{g - m},  κ = k ⊙ e^{m - c}:     y = (q ⊙ e^m) · S0 + tril(q κᵀ) v  (+ u term),
#   chunk state update: S <- e^{c_last} ⊙ S + (κ ⊙ e^m)ᵀ v      (e^m · e^{m - c_j} = e^{c_last - c_j})
# -- plain matmuls and O(T·N) elementwise passes, no (L, L, N) pair tensor.  For QRWKV6 the current
# token is the diagonal of q κᵀ (e^{c_i - m} e^{m - c_i} = 1); classic adds (r ⊙ u · k) v instead.
# Every factor lies in [e^{-span/2}, e^{span/2}] with span = -c_last <= L · max(-log_w); the chunk is
# shortened per call until span <= _WKV6_SPAN, and below 2 tokens the sequential loop runs (only for
# decays far beyond the model's clamp: QRWKV6 clamps log_w >= -5, so chunks of 16 always fit).  The
# products above the diagonal may overflow; tril selects, so they never reach y or a gradient.
# Cumulative decays are summed in fp64, so chunk length costs no precision.
# Tensors: (..., L, N) with ... = (B, H, chunks).
# ---------------------------------------------------------------------------------------------

_WKV6_SPAN = {torch.float32: 80.0, torch.float64: 600.0}  # factors within e^{±40} (fp32), e^{±300} (fp64)


def _chunk_states(kd, v, decay, S):
    """Initial state of every chunk and the final state: in parallel dS = kdᵀ v per chunk, then
    sequentially S <- decay ⊙ S + dS (decay (..., N, 1) scales the key rows)."""
    dS = kd.transpose(-1, -2) @ v  # (B, H, nc, N, N)
    starts = []
    for decay_i, dS_i in zip(decay.unbind(2), dS.unbind(2)):  # unbind: backward stacks the gradients once
        starts.append(S)
        S = torch.addcmul(dS_i, decay_i, S)
    return torch.stack(starts, 2), S


def _wkv6_chunked(r, k, v, log_w, u, S, L):
    """Pad T to a multiple of L (log_w = 0, k = 0: the final state stays exact), factorised decays,
    chunk states in sequence, then every chunk's output at once."""
    T, dt, pad = r.shape[1], S.dtype, -r.shape[1] % L
    prep = lambda x: F.pad(x.to(dt).transpose(1, 2), (0, 0, 0, pad)).unflatten(2, (-1, L))
    r, k, v = map(prep, (r, k, v))  # (B, H, nc, L, N)
    lw = prep(log_w.double())
    c = lw.cumsum(-2)
    m = c[..., -1:, :] / 2
    g = c if u is None else c - lw  # classic: exclusive cumsum c_{i-1}
    q, kappa, em = r * (g - m).to(dt).exp(), k * (m - c).to(dt).exp(), m.to(dt).exp()
    S0, S = _chunk_states(kappa * em, v, em.square().transpose(-1, -2), S)
    y = (q * em) @ S0 + (q @ kappa.transpose(-1, -2)).tril(0 if u is None else -1) @ v
    if u is not None:  # classic current token: (r_i ⊙ u · k_i) v_i
        y = y + (r * u.to(dt)[:, None, None, :] * k).sum(-1, keepdim=True) * v
    return y.flatten(2, 3)[:, :, :T].transpose(1, 2), S


def _wkv6_chunk_len(log_w, chunk_size, dt):
    """The longest chunk <= chunk_size whose factorised decays stay within e^{±span/2} (see above)."""
    strongest = -log_w.detach().min().item()
    return chunk_size if strongest * chunk_size <= _WKV6_SPAN[dt] else int(_WKV6_SPAN[dt] // strongest)


# ---------------------------------------------------------------------------------------------
# CUDA / HIP forward kernel
# ---------------------------------------------------------------------------------------------

_CUDA_HEAD_SIZES = (32, 64, 128)
_CUDA_DECL = "std::vector<torch::Tensor> wkv6_forward(torch::Tensor r, torch::Tensor k, torch::Tensor v, " \
             "torch::Tensor log_w, torch::Tensor u, torch::Tensor state);"
_CUDA_SRC = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

// One block per (batch, head); thread j keeps column j of the state, S[:, j], in registers.
// Per token: S = diag(w) S + k^T v;  y_j = sum_i r_i S_ij  (QRWKV6), or, classic (CLASSIC = u given),
// y_j = sum_i r_i (S_ij + u_i k_i v_j) read before the update.  fp32 throughout.
template <typename F, int N, bool CLASSIC>
__global__ void wkv6_fwd(int T, int H, const F* __restrict__ r, const F* __restrict__ k,
                         const F* __restrict__ v, const float* __restrict__ log_w,
                         const float* __restrict__ u, float* __restrict__ S, F* __restrict__ y) {
    const int b = blockIdx.x / H, h = blockIdx.x % H, j = threadIdx.x;
    __shared__ float sr[N], sk[N], sw[N], su[N];
    float s[N];
    float* Sbh = S + (size_t)blockIdx.x * N * N;
#pragma unroll
    for (int i = 0; i < N; i++) s[i] = Sbh[i * N + j];
    if (CLASSIC) su[j] = u[h * N + j];
    for (int t = 0; t < T; t++) {
        const size_t o = (((size_t)b * T + t) * H + h) * N + j;  // (B, T, H, N) contiguous
        __syncthreads();
        sr[j] = float(r[o]);
        sk[j] = float(k[o]);
        sw[j] = expf(log_w[o]);
        const float vj = float(v[o]);
        __syncthreads();
        float yj = 0.f;
#pragma unroll
        for (int i = 0; i < N; i++) {
            const float kv = sk[i] * vj;
            if (CLASSIC) yj += sr[i] * (s[i] + su[i] * kv);
            s[i] = s[i] * sw[i] + kv;
            if (!CLASSIC) yj += sr[i] * s[i];
        }
        y[o] = F(yj);
    }
#pragma unroll
    for (int i = 0; i < N; i++) Sbh[i * N + j] = s[i];
}

template <typename F, int N>
void launch(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
            const torch::Tensor& log_w, const torch::Tensor& u, torch::Tensor& S, torch::Tensor& y) {
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    const float* up = u.numel() ? u.data_ptr<float>() : nullptr;
    auto kernel = up ? wkv6_fwd<F, N, true> : wkv6_fwd<F, N, false>;
    kernel<<<B * H, N, 0, c10::cuda::getCurrentCUDAStream()>>>(
        T, H, r.data_ptr<F>(), k.data_ptr<F>(), v.data_ptr<F>(), log_w.data_ptr<float>(), up,
        S.data_ptr<float>(), y.data_ptr<F>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename F>
void launch_n(const torch::Tensor& r, const torch::Tensor& k, const torch::Tensor& v,
              const torch::Tensor& log_w, const torch::Tensor& u, torch::Tensor& S, torch::Tensor& y) {
    switch (r.size(3)) {
        case 32: launch<F, 32>(r, k, v, log_w, u, S, y); break;
        case 64: launch<F, 64>(r, k, v, log_w, u, S, y); break;
        case 128: launch<F, 128>(r, k, v, log_w, u, S, y); break;
        default: TORCH_CHECK(false, "wkv6 cuda: head size must be 32, 64 or 128");
    }
}

// r, k, v: (B, T, H, N) contiguous, one dtype of fp32/fp16/bf16; log_w fp32 like r; u fp32 (H, N) or
// empty; state fp32 (B, H, N, N).  Returns (y in r's dtype, new state).
std::vector<torch::Tensor> wkv6_forward(torch::Tensor r, torch::Tensor k, torch::Tensor v,
                                        torch::Tensor log_w, torch::Tensor u, torch::Tensor state) {
    const c10::cuda::CUDAGuard guard(r.device());
    auto S = state.clone();
    auto y = torch::empty_like(r);
    switch (r.scalar_type()) {
        case at::kFloat: launch_n<float>(r, k, v, log_w, u, S, y); break;
        case at::kHalf: launch_n<at::Half>(r, k, v, log_w, u, S, y); break;
        case at::kBFloat16: launch_n<at::BFloat16>(r, k, v, log_w, u, S, y); break;
        default: TORCH_CHECK(false, "wkv6 cuda: inputs must be fp32, fp16 or bf16");
    }
    return {y, S};
}
"""

_cuda = {"module": None, "failed": False}


def _cuda_module():
    """Compile the kernel once (build dir keyed by the source hash; a `lock` left by a killed
    compile is removed after 5 minutes).  On any failure: one notice on stderr, return None."""
    if _cuda["module"] is None and not _cuda["failed"]:
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("no GPU")
            from torch.utils.cpp_extension import load_inline
            name = "wkv6_" + hashlib.sha1((_CUDA_DECL + _CUDA_SRC).encode()).hexdigest()[:12]
            root = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
            build = os.path.join(root, name)
            os.makedirs(build, exist_ok=True)
            lock = os.path.join(build, "lock")
            if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > 300:
                os.remove(lock)
            flags = ["-O3"] if torch.version.hip else ["-O3", "-Xptxas=-O3", "--extra-device-vectorization"]
            _cuda["module"] = load_inline(name, cpp_sources=_CUDA_DECL, cuda_sources=_CUDA_SRC,
                                          functions=["wkv6_forward"], extra_cuda_cflags=flags,
                                          build_directory=build)
        except Exception as e:  # no GPU, no compiler, failed build: the torch path still works
            _cuda["failed"] = True
            print(f"wkv6: CUDA kernel unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                  f"using the chunked torch path", file=sys.stderr)
    return _cuda["module"]


def _wkv6_cuda(mod, r, k, v, log_w, u, S):
    """Forward-only kernel call; inputs made contiguous, log_w/u/state fp32."""
    empty = torch.empty(0, device=r.device)
    y, S = mod.wkv6_forward(r.contiguous(), k.to(r.dtype).contiguous(), v.to(r.dtype).contiguous(),
                            log_w.float().contiguous(), empty if u is None else u.float().contiguous(),
                            S.float().contiguous())
    return y, S


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

def wkv6(r, k, v, log_w, u=None, state=None, backend=None, chunk_size=16):
    """(y, new_state) of the WKV6 recurrence; see the module docstring for shapes and the math."""
    if r.dim() != 4 or not (r.shape == k.shape == v.shape == log_w.shape):
        raise ValueError(f"r, k, v, log_w must share one (B, T, H, N) shape, got "
                         f"{tuple(r.shape)} {tuple(k.shape)} {tuple(v.shape)} {tuple(log_w.shape)}")
    if backend not in (None,) + BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    B, T, H, N = r.shape
    dt = torch.promote_types(r.dtype, torch.float32)
    S = r.new_zeros(B, H, N, N, dtype=dt) if state is None else state.to(dt)

    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (r, k, v, log_w, u, state))
    if backend == "cuda" or (backend is None and r.is_cuda):
        mod = _cuda_module()
        if (mod is not None and r.is_cuda and not needs_grad and N in _CUDA_HEAD_SIZES
                and r.dtype in (torch.float32, torch.float16, torch.bfloat16)):
            return _wkv6_cuda(mod, r, k, v, log_w, u, S)

    if T == 1:  # decoding: one direct step
        u = None if u is None else u.to(dt)
        y, S = _step(r[:, 0].to(dt), k[:, 0].to(dt), v[:, 0].to(dt), log_w[:, 0].to(dt).exp(), u, S)
        return y.unsqueeze(1).to(r.dtype), S
    L = 1 if backend == "sequential" else _wkv6_chunk_len(log_w, chunk_size, dt)
    y, S = _wkv6_sequential(r, k, v, log_w, u, S) if L < 2 else _wkv6_chunked(r, k, v, log_w, u, S, L)
    return y.to(r.dtype), S


# =============================================================================================
# WKV7: the RWKV-7 recurrence (generalised delta rule) of the rwkv7qwen2 student
# =============================================================================================
#
# Per batch and head, state S of shape (N, N) indexed [key, value], column vectors, w_t = exp(log_w_t):
#
#     S_t = (diag(w_t) + b_t a_tᵀ) S_{t-1} + k_t v_tᵀ,        y_t = S_tᵀ r_t
#
# (y reads the updated state; no scale, no bonus.)  RAD-RWKV7 passes a = -κ̂, b = κ̂ ⊙ iclr: the state first
# forgets a fraction iclr of what it stores along the unit key κ̂, then writes k vᵀ.
#
#     wkv7(r, k, v, log_w, a, b, state=None, backend=None, chunk_size=16) -> (y, new_state)
#
# Chunked form (notes/rwkv7qwen2.md §9, FLA's chunk_dplr).  Inside a chunk of Lc tokens starting from S0,
# g_i = Σ_{j<=i} log_w_j restarts at the chunk start (g_{-1} = 0) and u_i = S_{i-1}ᵀ a_i is the row that the
# rank-1 term moves along b_i.  Unrolling the recurrence:
#
#     S_i = e^{g_i} ⊙ S0 + Σ_{j<=i} e^{g_i - g_j} ⊙ (b_j u_jᵀ + k_j v_jᵀ)         (⊙ scales the key rows)
#
# With row stacks U, V, Y (Lc, N), A_xy[i, j] = Σ_d x_id y_jd e^{g_{i-1,d} - g_jd} for j < i and
# B_xy[i, j] = Σ_d x_id y_jd e^{g_id - g_jd} for j <= i:
#
#     (I - A_ab) U = (a ⊙ e^{g_{i-1}}) S0 + A_ak V        I - A_ab is unit lower triangular: one solve, giving
#                                                        U = W S0 + Ũ (the WY / UT representation)
#     Y   = (r ⊙ e^{g}) S0 + B_rb U + B_rk V = (r ⊙ e^{g} + B_rb W) S0 + (B_rb Ũ + B_rk V)
#     S_L = e^{g_L} ⊙ S0 + (b ⊙ e^{g_L - g})ᵀ U + (k ⊙ e^{g_L - g})ᵀ V = M S0 + Δ
#
# Everything but S0 is computed for all chunks in parallel; only S <- M S + Δ runs chunk by chunk.
# The pair decays are factorised, e^{g_i - g_j} = e^{g_i} · e^{-g_j}, so the scores are plain matmuls.  Every
# factor lies in [e^{-span}, e^{span}] with span = Lc · max(-log_w); the chunk is shortened per call until
# span <= _WKV7_SPAN (fp32: e^{±60} leaves 10^12 of headroom for the products), and below 2 tokens the
# sequential loop runs.  RAD-RWKV7 decays satisfy -log_w < e^{-1/2} = 0.6065, so chunks of up to 98 tokens
# are always used as asked.  Cumulative decays are summed in fp64, so chunk length costs no precision.
# Saved memory for backward is O(T): per chunk a few (Lc, N) and (Lc, Lc) tensors and M, Δ, S0 (N, N).

WKV7_BACKENDS = ("sequential", "chunked")
_WKV7_SPAN = {torch.float32: 60.0, torch.float64: 600.0}


def _wkv7_step(r, k, v, w, a, b, S):
    """One token, (B, H, N) vectors, S (B, H, N, N):  S' = diag(w) S + b (aᵀS) + k vᵀ;  y = S'ᵀ r."""
    u = a.unsqueeze(-2) @ S  # (B, H, 1, N): the row the rank-1 term moves along b
    S = w.unsqueeze(-1) * S + b.unsqueeze(-1) * u + k.unsqueeze(-1) * v.unsqueeze(-2)
    return (r.unsqueeze(-2) @ S).squeeze(-2), S


def _wkv7_sequential(r, k, v, log_w, a, b, S):
    """The recurrence token by token in S's dtype (fp64 for the test oracle)."""
    dt = S.dtype
    r, k, v, a, b, w = (x.to(dt) for x in (r, k, v, a, b, log_w.to(dt).exp()))
    ys = []
    for t in range(r.shape[1]):
        y, S = _wkv7_step(r[:, t], k[:, t], v[:, t], w[:, t], a[:, t], b[:, t], S)
        ys.append(y)
    return torch.stack(ys, 1), S


def _unit_lower_inverse(A):
    """(I - A)^{-1} for strictly lower-triangular A (..., n, n): block forward substitution that doubles the
    solved diagonal blocks each round, [[I-P, 0], [-R, I-Q]]^{-1} = [[X, 0], [Y R X, Y]] = D + D R' D with
    D = diag(X, Y) and R' = the block R alone.  log2(n) rounds of two batched matmuls (a batched LAPACK
    triangular solve of many 16x16 systems measured 25x slower on CPU)."""
    n, i = A.shape[-1], torch.arange(A.shape[-1], device=A.device)
    X = torch.eye(n, dtype=A.dtype, device=A.device).expand_as(A)
    s = 1
    while s < n:
        R = A * ((i[:, None] // (2 * s) == i // (2 * s)) & (i[:, None] // s > i // s))
        X, s = X + X @ R @ X, 2 * s
    return X


def _wkv7_chunk_terms(r, k, v, log_w, a, b):
    """Per chunk, in parallel, (B, H, nc, Lc, N) inputs: Q, Y_in (Y = Q S0 + Y_in) and M, Δ (S_L = M S0 + Δ)."""
    Lc, dt = r.shape[-2], r.dtype
    g64 = log_w.double().cumsum(-2)
    e, ep, ie, ed = (x.exp().to(dt) for x in (g64, g64 - log_w.double(), -g64, g64[..., -1:, :] - g64))
    incl = torch.ones(Lc, Lc, dtype=torch.bool, device=r.device).tril()
    strict = incl.tril(-1)
    bk = torch.cat([b * ie, k * ie], -2).transpose(-1, -2)  # (.., N, 2Lc): b_j e^{-g_j}, k_j e^{-g_j}
    A_ab, A_ak = ((a * ep) @ bk).mul(strict.repeat(1, 2)).split(Lc, -1)
    B_rb, B_rk = ((r * e) @ bk).mul(incl.repeat(1, 2)).split(Lc, -1)
    W, Ut = (_unit_lower_inverse(A_ab) @ torch.cat([a * ep, A_ak @ v], -1)).split(r.shape[-1], -1)
    Q, Y_in = r * e + B_rb @ W, B_rb @ Ut + B_rk @ v
    bd, kd = (b * ed).transpose(-1, -2), (k * ed).transpose(-1, -2)
    M = torch.diag_embed(e[..., -1, :]) + bd @ W
    return Q, Y_in, M, bd @ Ut + kd @ v


def _wkv7_chunked(r, k, v, log_w, a, b, S, Lc):
    """Pad T to a multiple of Lc (a = b = k = 0, log_w = 0: padded tokens leave S as it is), chunk terms in
    parallel, the chunk states in sequence, then Y = Q S0 + Y_in for all chunks."""
    T, dt, pad = r.shape[1], S.dtype, -r.shape[1] % Lc
    prep = lambda x: F.pad(x.to(dt).transpose(1, 2), (0, 0, 0, pad)).unflatten(2, (-1, Lc))
    Q, Y_in, M, Delta = _wkv7_chunk_terms(*map(prep, (r, k, v, log_w, a, b)))
    starts = []
    for M_i, D_i in zip(M.unbind(2), Delta.unbind(2)):  # unbind: backward stacks the gradients once
        starts.append(S)
        S = torch.baddbmm(D_i.flatten(0, 1), M_i.flatten(0, 1), S.flatten(0, 1)).view_as(S)
    y = Q @ torch.stack(starts, 2) + Y_in
    return y.flatten(2, 3)[:, :, :T].transpose(1, 2), S


def _wkv7_chunk_len(log_w, chunk_size, dt):
    """The longest chunk <= chunk_size whose factorised decays stay within e^{±_WKV7_SPAN} (see above)."""
    strongest = -log_w.detach().min().item()
    return chunk_size if strongest * chunk_size <= _WKV7_SPAN[dt] else int(_WKV7_SPAN[dt] // strongest)


def wkv7(r, k, v, log_w, a, b, state=None, backend=None, chunk_size=16):
    """(y, new_state) of the WKV7 recurrence S_t = (diag(w_t) + b_t a_tᵀ) S_{t-1} + k_t v_tᵀ, y_t = S_tᵀ r_t.

    Args:
        r, k, v, a, b: (B, T, H, N) in one dtype (fp32, bf16, fp16 or fp64).
        log_w: (B, T, H, N), <= 0, fp32 (or fp64): log of the per-channel decay w_t.
        state: (B, H, N, N) fp32 [key, value], or None for zeros.
        backend: "sequential" (per-token loop, the oracle), "chunked" or None (= chunked; T == 1 is one step).
        chunk_size: tokens per chunk of the chunked form.
    Returns:
        y (B, T, H, N) in r's dtype, new_state (B, H, N, N) fp32 (fp64 for fp64 inputs).
    Example:
        >>> y, S = wkv7(r, k, v, log_w, -kk, kk * iclr)                      # prefill
        >>> y1, S = wkv7(r1, k1, v1, log_w1, -kk1, kk1 * iclr1, state=S)    # next token
    """
    xs = (r, k, v, log_w, a, b)
    if r.dim() != 4 or any(x.shape != r.shape for x in xs):
        raise ValueError(f"r, k, v, log_w, a, b must share one (B, T, H, N) shape, got {[tuple(x.shape) for x in xs]}")
    if backend not in (None,) + WKV7_BACKENDS:
        raise ValueError(f"backend must be one of {WKV7_BACKENDS} or None, got {backend!r}")
    B, T, H, N = r.shape
    dt = torch.promote_types(r.dtype, torch.float32)
    S = r.new_zeros(B, H, N, N, dtype=dt) if state is None else state.to(dt)
    if T == 1:  # decoding: one direct step
        y, S = _wkv7_step(*(x[:, 0].to(dt) for x in (r, k, v)), log_w[:, 0].to(dt).exp(),
                          a[:, 0].to(dt), b[:, 0].to(dt), S)
        return y.unsqueeze(1).to(r.dtype), S
    Lc = 1 if backend == "sequential" else _wkv7_chunk_len(log_w, chunk_size, dt)
    y, S = _wkv7_sequential(*xs, S) if Lc < 2 else _wkv7_chunked(*xs, S, Lc)
    return y.to(r.dtype), S
