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
import functools
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
# Tensors: (nc, B·H, L, N), chunk-major, so every chunk's matmuls are one batched call.
# ---------------------------------------------------------------------------------------------

def _fp32_math(fn):
    """Run fn with autocast off: the recurrences do their own dtype handling (fp32 state, fp32 decay exponents),
    and under a caller's bf16 autocast their matmuls would otherwise drop to bf16 (and `out=` buffers clash)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        x = next(a for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(x.device.type, enabled=False):
            return fn(*args, **kwargs)
    return wrapped


_WKV6_SPAN = {torch.float32: 80.0, torch.float64: 600.0}  # factors within e^{±40} (fp32), e^{±300} (fp64)


def _factors(lw, classic):
    """e^{g - m}, e^{m - c}, e^m from log_w (..., L, N); cumulative sums in fp64, factors in lw's dtype."""
    c = lw.cumsum(-2, dtype=torch.float64)
    m = c[..., -1:, :] / 2
    g = c - lw if classic else c  # classic: exclusive cumsum c_{i-1}
    return (g - m).to(lw.dtype).exp(), (m - c).to(lw.dtype).exp(), m.to(lw.dtype).exp()


class _Chunked(torch.autograd.Function):
    """y, S_final of the chunked form for (nc, B·H, L, N) inputs, S (B·H, N, N), u (B·H, 1, N) or None.
    The chunk states live in one (nc + 1, B·H, N, N) buffer, advanced in place: states[i + 1] =
    e^{c_last} ⊙ states[i] + dS_i.  Backward runs the same recurrence backwards on the state gradients,
    G_i = dL/d states[i] = qeᵀ dy_i + e^{c_last} ⊙ G_{i+1}, then every chunk's gradients at once;
    the factors are saved from forward, the decay gradient is the chain rule through the exponents:
    with q = r e^{g-m}, κ = k e^{m-c}:  d(g - m) = dq ⊙ q,  d(m - c) = dκ ⊙ κ,  dlog_w = reverse cumsum of dc."""

    @staticmethod
    def forward(ctx, r, k, v, lw, u, S):
        eq, ek, em = _factors(lw, u is not None)
        q, kappa = r * eq, k * ek
        A = (q @ kappa.mT).tril_(0 if u is None else -1)
        states = S.new_empty(r.shape[0] + 1, *S.shape)
        states[0] = S
        torch.matmul((kappa * em).mT, v, out=states[1:])  # dS_i = Σ_j (k_j e^{c_last - c_j})ᵀ v_j
        decay = em.square().mT  # e^{c_last}, (nc, BH, N, 1): scales the key rows
        for i in range(r.shape[0]):
            states[i + 1].addcmul_(decay[i], states[i])
        y = torch.matmul(q * em, states[:-1]).add_(A @ v)
        if u is not None:  # classic current token: (r_i ⊙ u · k_i) v_i
            y.addcmul_((r * u * k).sum(-1, keepdim=True), v)
        rk = (r, k) if u is not None else (None, None)  # only the classic u term needs r and k again
        ctx.save_for_backward(*rk, v, u, q, kappa, eq, ek, em, A, states)
        return y, states[-1].clone()

    @staticmethod
    @_fp32_math   # the backward runs under the autocast state of the forward's caller
    def backward(ctx, dy, dS_last):
        r, k, v, u, q, kappa, eq, ek, em, A, states = ctx.saved_tensors
        dy = dy.contiguous()  # arrives as a permuted view of y's gradient; matmuls would copy it each time
        S0, decay, qe, kd = states[:-1], em.square().mT, q * em, kappa * em
        G = torch.empty_like(states)  # G[i] = dL/d states[i]
        G[-1] = dS_last
        torch.matmul(qe.mT, dy, out=G[:-1])  # direct use: y_i = qe_i · S0_i + ...
        for i in reversed(range(v.shape[0])):
            G[i].addcmul_(decay[i], G[i + 1])
        Gn = G[1:]  # dL/d dS_i
        d_qe = dy @ S0.mT
        dA = (dy @ v.mT).tril_(0 if u is None else -1)
        dv = torch.matmul(A.mT, dy).add_(kd @ Gn)
        d_kd = v @ Gn.mT
        dq = torch.addcmul(dA @ kappa, d_qe, em)
        dkappa = torch.addcmul(dA.mT @ q, d_kd, em)
        d_decay = (Gn * S0).sum(-1).unsqueeze(-2)  # (nc, BH, 1, N)
        d_em = (d_qe * q).sum(-2, keepdim=True) + (d_kd * kappa).sum(-2, keepdim=True) + 2 * em * d_decay
        dg, dmc = dq * q, dkappa * kappa  # dL/d(g - m), dL/d(m - c)
        dm = d_em * em - dg.sum(-2, keepdim=True) + dmc.sum(-2, keepdim=True)
        dc = dg - dmc
        dc[..., -1:, :] += dm / 2
        dlw = dc.flip(-2).cumsum(-2).flip(-2)  # c_i = Σ_{j<=i} lw_j
        dr, dk, du = dq * eq, dkappa * ek, None
        if u is not None:  # g = c - lw, and the current-token term β v with β = Σ r u k
            dlw -= dg
            dbeta = (dy * v).sum(-1, keepdim=True)
            dv.addcmul_((r * u * k).sum(-1, keepdim=True), dy)
            dr.addcmul_(dbeta, u * k)
            dk.addcmul_(dbeta, r * u)
            du = (dbeta * r * k).sum((0, 2)).unsqueeze(1)
        return dr, dk, dv, dlw, du, G[0]


def _wkv6_chunked(r, k, v, log_w, u, S, L):
    """Pad T to a multiple of L (log_w = 0, k = 0: the final state stays exact), lay the chunks out as
    (nc, B·H, L, N), run _Chunked, and put y back to (B, T, H, N)."""
    (B, _, H, N), dt = r.shape, S.dtype
    uu = None if u is None else u.to(dt).repeat(B, 1).unsqueeze(1)  # (B·H, 1, N)
    y, S = _in_groups(lambda r, k, v, lw, S: _Chunked.apply(r, k, v, lw, uu, S), (r, k, v, log_w), S.reshape(B * H, N, N), L, dt)
    return y, S.view(B, H, N, N)


# Chunks per autograd.Function call: ~1 MiB of fp32 per (chunks, B·H, L, N) operand, one core's L2.  The batched
# matmuls and elementwise passes then work in cache instead of streaming every chunk of the sequence through memory
# once per op.  wkv7 forward + backward at T = 2048 (B=1, H=9, N=64, chunk 32, 1 thread): 10k -> 14k tokens/CPU-s
# (groups of 16 chunks measured best of 2-32, all chunks at once slowest).
GROUP_ELEMS = 1 << 18


def _in_groups(apply, xs, S, L, dt):
    """(y, S) of the chunked form run piece by piece: the (B, T, H, N) inputs `xs` split along T into pieces of
    whole chunks of L tokens, each laid out by _to_chunks and passed to apply(*chunks, S) -> (y, S), the state carried
    from piece to piece (autograd carries its gradient back), y put back to (B, T, H, N)."""
    B, _, H, N = xs[0].shape
    G = max(1, GROUP_ELEMS // (B * H * L * N))
    ys = []
    for piece in zip(*(x.split(G * L, dim=1) for x in xs)):   # split, not slicing: its backward is one concatenation
        y, S = apply(*(_to_chunks(p, L, dt) for p in piece), S)
        ys.append(_from_chunks(y, piece[0].shape))
    return torch.cat(ys, 1) if len(ys) > 1 else ys[0], S


def _to_chunks(x, L, dt):
    """One copy: (B, T, H, N) -> (nc, B·H, L, N) in dt, T zero-padded to a multiple of L, contiguous for the
    batched matmuls (zero k and log_w leave the final state exact in both recurrences)."""
    B, T, H, N = x.shape
    pad = -T % L
    x = F.pad(x.to(dt), (0, 0, 0, 0, 0, pad)) if pad else x.to(dt)
    return x.unflatten(1, (-1, L)).permute(1, 0, 3, 2, 4).reshape(-1, B * H, L, N).contiguous()


def _from_chunks(y, shape):
    """(nc, B·H, L, N) -> (B, T, H, N) of the original `shape`: the inverse of _to_chunks, padding dropped."""
    B, T, H, N = shape
    return y.view(-1, B, H, y.shape[-2], N).permute(1, 0, 3, 2, 4).reshape(B, -1, H, N)[:, :T]


def _wkv6_chunk_len(log_w, chunk_size, dt):
    """The longest chunk <= chunk_size whose factorised decays stay within e^{±span/2} (see above)."""
    strongest = -log_w.detach().min().item()
    return chunk_size if strongest * chunk_size <= _WKV6_SPAN[dt] else int(_WKV6_SPAN[dt] // strongest)


# ---------------------------------------------------------------------------------------------
# CUDA / HIP forward kernels (wkv6 and wkv7)
# ---------------------------------------------------------------------------------------------

_CUDA_HEAD_SIZES = (32, 64, 128)
_CUDA_DECL = "\n".join(f"std::vector<torch::Tensor> {f}(torch::Tensor r, torch::Tensor k, torch::Tensor v, "
                       f"torch::Tensor log_w, {extra}torch::Tensor state);"
                       for f, extra in (("wkv6_forward", "torch::Tensor u, "),
                                        ("wkv7_forward", "torch::Tensor a, torch::Tensor b, ")))
_CUDA_SRC = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <type_traits>

// Both kernels: one block per (batch, head); thread j keeps column j of the state, S[:, j], in registers
// (S indexed [key, value]), so every per-token sum over keys is local to the thread.  fp32 throughout.
// WKV6, per token: S = diag(w) S + k^T v;  y_j = sum_i r_i S_ij  (QRWKV6), or, classic (CLASSIC = u given),
// y_j = sum_i r_i (S_ij + u_i k_i v_j) read before the update.
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

// WKV7, per token: u_j = sum_i a_i S_ij;  S_ij = w_i S_ij + b_i u_j + k_i v_j;  y_j = sum_i r_i S_ij
// (S_t = (diag(w) + b a^T) S_{t-1} + k v^T, y = S_t^T r: reads the updated state).
template <typename F, int N>
__global__ void wkv7_fwd(int T, int H, const F* __restrict__ r, const F* __restrict__ k,
                         const F* __restrict__ v, const float* __restrict__ log_w, const F* __restrict__ a,
                         const F* __restrict__ b, float* __restrict__ S, F* __restrict__ y) {
    const int bt = blockIdx.x / H, h = blockIdx.x % H, j = threadIdx.x;
    __shared__ float sr[N], sk[N], sw[N], sa[N], sb[N];
    float s[N];
    float* Sbh = S + (size_t)blockIdx.x * N * N;
#pragma unroll
    for (int i = 0; i < N; i++) s[i] = Sbh[i * N + j];
    for (int t = 0; t < T; t++) {
        const size_t o = (((size_t)bt * T + t) * H + h) * N + j;  // (B, T, H, N) contiguous
        __syncthreads();
        sr[j] = float(r[o]);
        sk[j] = float(k[o]);
        sw[j] = expf(log_w[o]);
        sa[j] = float(a[o]);
        sb[j] = float(b[o]);
        const float vj = float(v[o]);
        __syncthreads();
        float uj = 0.f, yj = 0.f;
#pragma unroll
        for (int i = 0; i < N; i++) uj += sa[i] * s[i];
#pragma unroll
        for (int i = 0; i < N; i++) {
            s[i] = s[i] * sw[i] + sb[i] * uj + sk[i] * vj;
            yj += sr[i] * s[i];
        }
        y[o] = F(yj);
    }
#pragma unroll
    for (int i = 0; i < N; i++) Sbh[i * N + j] = s[i];
}

// fn(F{}, std::integral_constant<int, N>{}) for r's dtype and head size (the kernels' template arguments).
template <typename Fn>
void dispatch(const torch::Tensor& r, Fn fn) {
    auto with_n = [&](auto f) {
        switch (r.size(3)) {
            case 32: fn(f, std::integral_constant<int, 32>{}); break;
            case 64: fn(f, std::integral_constant<int, 64>{}); break;
            case 128: fn(f, std::integral_constant<int, 128>{}); break;
            default: TORCH_CHECK(false, "wkv cuda: head size must be 32, 64 or 128");
        }
    };
    switch (r.scalar_type()) {
        case at::kFloat: with_n(float{}); break;
        case at::kHalf: with_n(at::Half{}); break;
        case at::kBFloat16: with_n(at::BFloat16{}); break;
        default: TORCH_CHECK(false, "wkv cuda: inputs must be fp32, fp16 or bf16");
    }
}

// r, k, v (and a, b): (B, T, H, N) contiguous, one dtype of fp32/fp16/bf16; log_w fp32 like r; u fp32 (H, N)
// or empty; state fp32 (B, H, N, N).  Return (y in r's dtype, new state).
std::vector<torch::Tensor> wkv6_forward(torch::Tensor r, torch::Tensor k, torch::Tensor v,
                                        torch::Tensor log_w, torch::Tensor u, torch::Tensor state) {
    const c10::cuda::CUDAGuard guard(r.device());
    auto S = state.clone();
    auto y = torch::empty_like(r);
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    const float* up = u.numel() ? u.data_ptr<float>() : nullptr;
    dispatch(r, [&](auto f, auto n) {
        using F = decltype(f);
        auto kernel = up ? wkv6_fwd<F, decltype(n)::value, true> : wkv6_fwd<F, decltype(n)::value, false>;
        kernel<<<B * H, n.value, 0, c10::cuda::getCurrentCUDAStream()>>>(
            T, H, r.data_ptr<F>(), k.data_ptr<F>(), v.data_ptr<F>(), log_w.data_ptr<float>(), up,
            S.data_ptr<float>(), y.data_ptr<F>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {y, S};
}

std::vector<torch::Tensor> wkv7_forward(torch::Tensor r, torch::Tensor k, torch::Tensor v,
                                        torch::Tensor log_w, torch::Tensor a, torch::Tensor b, torch::Tensor state) {
    const c10::cuda::CUDAGuard guard(r.device());
    auto S = state.clone();
    auto y = torch::empty_like(r);
    const int B = r.size(0), T = r.size(1), H = r.size(2);
    dispatch(r, [&](auto f, auto n) {
        using F = decltype(f);
        wkv7_fwd<F, decltype(n)::value><<<B * H, n.value, 0, c10::cuda::getCurrentCUDAStream()>>>(
            T, H, r.data_ptr<F>(), k.data_ptr<F>(), v.data_ptr<F>(), log_w.data_ptr<float>(), a.data_ptr<F>(),
            b.data_ptr<F>(), S.data_ptr<float>(), y.data_ptr<F>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {y, S};
}
"""

_cuda = {"module": None, "failed": False}


def _cuda_module():
    """Compile the kernels once (build dir keyed by the source hash; a `lock` left by a killed
    compile is removed after 5 minutes).  On any failure: one notice on stderr, return None."""
    if _cuda["module"] is None and not _cuda["failed"]:
        try:
            if not torch.cuda.is_available():
                raise RuntimeError("no GPU")
            from torch.utils.cpp_extension import load_inline
            name = "wkv_" + hashlib.sha1((_CUDA_DECL + _CUDA_SRC).encode()).hexdigest()[:12]
            root = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
            build = os.path.join(root, name)
            os.makedirs(build, exist_ok=True)
            lock = os.path.join(build, "lock")
            if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > 300:
                os.remove(lock)
            flags = ["-O3"] if torch.version.hip else ["-O3", "-Xptxas=-O3", "--extra-device-vectorization"]
            _cuda["module"] = load_inline(name, cpp_sources=_CUDA_DECL, cuda_sources=_CUDA_SRC,
                                          functions=["wkv6_forward", "wkv7_forward"], extra_cuda_cflags=flags,
                                          build_directory=build)
        except Exception as e:  # no GPU, no compiler, failed build: the torch path still works
            _cuda["failed"] = True
            print(f"wkv: CUDA kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                  f"using the chunked torch path", file=sys.stderr)
    return _cuda["module"]


def _cuda_kernels(backend, xs):
    """The compiled module when this call may use it, else None (the torch path): backend "cuda", or None with GPU
    tensors; forward only (no input of `xs` = (r, ..., state) needs a gradient); head size 32, 64 or 128; r in
    fp32, fp16 or bf16.  backend="cuda" on a machine without the kernels prints the one notice of _cuda_module."""
    r = xs[0]
    if backend != "cuda" and not (backend is None and r.is_cuda):
        return None
    mod = _cuda_module()
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)
    usable = (r.is_cuda and not needs_grad and r.shape[-1] in _CUDA_HEAD_SIZES
              and r.dtype in (torch.float32, torch.float16, torch.bfloat16))
    return mod if usable else None


def _wkv_cuda(forward, r, k, v, log_w, *extra, S):
    """(y, new_state) of one forward-only kernel call: r, k, v contiguous in r's dtype, log_w and the state fp32;
    `extra` (wkv6: u fp32 or empty, wkv7: a, b in r's dtype) passed as given."""
    same = lambda x: x.to(r.dtype).contiguous()
    return forward(same(r), same(k), same(v), log_w.float().contiguous(), *extra, S.float().contiguous())


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

@_fp32_math
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

    mod = _cuda_kernels(backend, (r, k, v, log_w, u, state))
    if mod is not None:
        u = torch.empty(0, device=r.device) if u is None else u.float().contiguous()
        return _wkv_cuda(mod.wkv6_forward, r, k, v, log_w, u, S=S)

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
#     wkv7(r, k, v, log_w, a, b, state=None, backend=None, chunk_size=32) -> (y, new_state)
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
#     S_Lc = e^{g_Lc} ⊙ S0 + (b ⊙ e^{g_Lc - g})ᵀ U + (k ⊙ e^{g_Lc - g})ᵀ V
#
# Everything but S0 is computed for all chunks in parallel; only U = W S0 + Ũ and S_Lc run chunk by chunk.
# Cost per token and head, forward + backward: 12 N² + 27 Lc·N multiply-adds in batched matmuls (N = 64, Lc = 32:
# ~104k), against ~4 N² for the per-token loop, whose time goes to per-op overhead at these sizes instead.
# The pair decays are factorised, e^{g_i - g_j} = e^{g_i} · e^{-g_j}, so the scores are plain matmuls.  Every
# factor lies in [e^{-span}, e^{span}] with span = Lc · max(-log_w); the chunk is shortened per call until
# span <= _WKV7_SPAN (fp32: e^{±60} leaves 10^12 of headroom for the products), and below 2 tokens the
# sequential loop runs.  RAD-RWKV7 decays satisfy -log_w < e^{-1/2} = 0.6065, so chunks of up to 98 tokens
# are always used as asked.  Cumulative decays are summed in fp64 and rounded once to the compute dtype, so chunk
# length adds no error beyond that one rounding (fp32: at most |g|·2^-24 in an exponent, ≤ 4e-6 at the span limit).
# Saved memory for backward is O(T): per chunk a few (Lc, N) and (Lc, Lc) tensors and M, Δ, S0 (N, N).

WKV7_BACKENDS = ("sequential", "chunked", "cuda")
_WKV7_SPAN = {torch.float32: 60.0, torch.float64: 600.0}


def _wkv7_step(r, k, v, w, a, b, S):
    """One token, (B, H, N) vectors, S (B, H, N, N):  S' = diag(w) S + b (aᵀS) + k vᵀ;  y = S'ᵀ r."""
    u = a.unsqueeze(-2) @ S  # (B, H, 1, N): the row the rank-1 term moves along b
    S = w.unsqueeze(-1) * S + b.unsqueeze(-1) * u + k.unsqueeze(-1) * v.unsqueeze(-2)
    return (r.unsqueeze(-2) @ S).squeeze(-2), S


def _wkv7_sequential(r, k, v, log_w, a, b, S):
    """The recurrence token by token in S's dtype (fp64 for the test oracle)."""
    dt = S.dtype
    ys = []
    for x_t in zip(*(x.to(dt).unbind(1) for x in (r, k, v, log_w.to(dt).exp(), a, b))):  # unbind: O(T) backward
        y, S = _wkv7_step(*x_t, S)
        ys.append(y)
    return torch.stack(ys, 1), S


def _unit_lower_inverse(A):
    """(I - A)^{-1} for strictly lower-triangular A (..., n, n): block forward substitution that doubles the
    solved diagonal blocks each round, [[I-P, 0], [-R, I-Q]]^{-1} = [[X, 0], [Y R X, Y]] with X = (I-P)^{-1},
    Y = (I-Q)^{-1}: ≈ n³ multiply-adds in log2(n) batched rounds (a batched LAPACK triangular solve of many
    16x16 systems measured 25x slower on CPU).  n is padded to a power of two with zeros (I there)."""
    n = A.shape[-1]
    m = 1 << max(n - 1, 0).bit_length()
    A = F.pad(A, (0, m - n, 0, m - n))
    X = torch.ones(*A.shape[:-2], m, 1, 1, dtype=A.dtype, device=A.device)  # (..., blocks, s, s), s = 1
    s = 1
    while s < m:
        nb = m // (2 * s)
        # R_p = A[rows of block 2p+1, columns of block 2p] for each pair p: (..., nb, s, s)
        R = A.unflatten(-1, (nb, 2, s)).unflatten(-4, (nb, 2, s))[..., :, 1, :, :, 0, :].diagonal(dim1=-4, dim2=-2)
        R = R.movedim(-1, -3)
        Xa, Xc = X[..., 0::2, :, :], X[..., 1::2, :, :]
        X = torch.cat([torch.cat([Xa, torch.zeros_like(Xa)], -1), torch.cat([Xc @ R @ Xa, Xc], -1)], -2)
        s *= 2
    return X.squeeze(-3)[..., :n, :n]


def _wkv7_masks(Lc, device):
    """(Lc, 2Lc) masks of [A_ab | A_ak] (strictly lower) and [B_rb | B_rk] (lower, diagonal included)."""
    incl = torch.ones(Lc, Lc, dtype=torch.bool, device=device).tril()
    return incl.tril(-1).repeat(1, 2), incl.repeat(1, 2)


class _Chunked7(torch.autograd.Function):
    """y, S_final of the chunked WKV7 form for (nc, B·H, Lc, N) inputs and S (B·H, N, N).
    Forward: the chunk terms of every chunk in a few batched matmuls (pairs concatenated: [ae; re] [bi; ki]ᵀ gives
    all four score blocks at once), then chunk by chunk U = W S0 + Ũ and S0 <- e^{g_Lc} ⊙ S0 + bdᵀ U + kdᵀ v,
    then Y = (r ⊙ e^g) S0 + [B_rb | B_rk] [U; v] for all chunks.  (Forming M = diag(e^{g_Lc}) + bdᵀ W instead
    costs an N³ product per chunk each way.)  Backward: the state gradients run the loop backwards,
    dU = B_rbᵀ dY + bd G_{i+1},  G_i = (r ⊙ e^g)ᵀ dY + Wᵀ dU + e^{g_Lc} ⊙ G_{i+1};  then every chunk's gradients
    at once by the chain rule through the forward's lines (read them bottom-up), with X = (I - A_ab)^{-1}:
    dX = X dA X  gives  dA_ab = (Xᵀ d[W | Ũ]) [W | Ũ]ᵀ  on the strictly lower part."""

    @staticmethod
    def forward(ctx, r, k, v, lw, a, b, S):
        nc, Lc, N = r.shape[0], *r.shape[-2:]
        strict, incl = _wkv7_masks(Lc, r.device)
        g = lw.cumsum(-2, dtype=torch.float64).to(lw.dtype)  # summed in fp64, one cast: exponents in lw's dtype
        e, ep, ie, ed = (x.exp() for x in (g, g - lw, -g, g[..., -1:, :] - g))
        ae, re = a * ep, r * e                   # a_i e^{g_{i-1}}, r_i e^{g_i}
        b_k = torch.stack([b, k], -3)            # (.., 2, Lc, N)
        bk = (b_k * ie.unsqueeze(-3)).flatten(-3, -2)  # b_j e^{-g_j}; k_j e^{-g_j}               (.., 2Lc, N)
        P = torch.cat([ae, re], -2) @ bk.mT      # [[ae biᵀ, ae kiᵀ], [re biᵀ, re kiᵀ]]          (.., 2Lc, 2Lc)
        A, Bs = P[..., :Lc, :].mul_(strict), P[..., Lc:, :].mul_(incl)   # [A_ab | A_ak], [B_rb | B_rk]
        X = _unit_lower_inverse(A[..., :Lc])
        WU = X @ torch.cat([ae, A[..., Lc:] @ v], -1)    # [W | Ũ]: U = W S0 + Ũ
        bdkd = (b_k * ed.unsqueeze(-3)).flatten(-3, -2)  # b_j e^{g_Lc - g_j}; k_j e^{g_Lc - g_j}
        bd, kd = bdkd.split(Lc, -2)
        eL = e[..., -1:, :].mT                   # e^{g_Lc} scales the key rows (.., N, 1)
        W, Ut, bdT = (x.contiguous() for x in (*WU.split(N, -1), bd.mT))  # the loop's operands, contiguous
        states, U = S.new_empty(nc + 1, *S.shape), Ut
        states[0] = S
        torch.matmul(kd.mT, v, out=states[1:])   # kdᵀ v
        for i in range(nc):
            U[i].baddbmm_(W[i], states[i])
            states[i + 1].baddbmm_(bdT[i], U[i]).addcmul_(eL[i], states[i])
        Uv = torch.cat([U, v], -2)
        y = torch.matmul(re, states[:-1]).add_(Bs @ Uv)
        ctx.save_for_backward(e, ep, ie, ed, ae, re, bk, A, Bs, X, WU, bdkd, Uv, states)
        return y, states[-1].clone()

    @staticmethod
    @_fp32_math   # the backward runs under the autocast state of the forward's caller
    def backward(ctx, dy, dS_last):
        e, ep, ie, ed, ae, re, bk, A, Bs, X, WU, bdkd, Uv, states = ctx.saved_tensors
        nc, Lc, N = dy.shape[0], *dy.shape[-2:]
        strict, incl = _wkv7_masks(Lc, dy.device)
        dy, S0, v, WT = dy.contiguous(), states[:-1], Uv[..., Lc:, :], WU[..., :N].mT.contiguous()
        dU, eL, (bd, kd) = Bs[..., :Lc].mT @ dy, e[..., -1:, :].mT, bdkd.split(Lc, -2)   # B_rbᵀ dY
        G = torch.empty_like(states)  # G[i] = dL/d states[i]
        G[-1] = dS_last
        torch.matmul(re.mT, dy, out=G[:-1])     # (r e^g)ᵀ dY
        for i in reversed(range(nc)):
            dU[i].baddbmm_(bd[i], G[i + 1])
            G[i].baddbmm_(WT[i], dU[i]).addcmul_(eL[i], G[i + 1])
        Gn = G[1:]
        dre, dW = (torch.cat([dy, dU], -2) @ S0.mT).split(Lc, -2)   # Y = (r e^g) S0 + ..., U = W S0 + Ũ
        d_bdkd = Uv @ Gn.mT                      # [dbd; dkd]
        dv = (Bs[..., Lc:].mT @ dy).add_(kd @ Gn)
        de_last = torch.linalg.vecdot(Gn, S0).unsqueeze(-2)  # S' = e^{g_Lc} ⊙ S0 + ...
        dBs = (dy @ Uv.mT).mul_(incl)            # Y = (r e^g) S0 + [B_rb | B_rk] [U; v]
        # [W | Ũ] = X [ae | A_ak v],  U = W S0 + Ũ
        dH = X.mT @ torch.cat([dW, dU], -1)
        dae, dZ = dH.split(N, -1)
        dA = torch.cat([dH @ WU.mT, dZ @ v.mT], -1).mul_(strict)
        dv += A[..., Lc:].mT @ dZ
        # P = [ae; re] [bi; ki]ᵀ
        dP = torch.cat([dA, dBs], -2)
        d_aere = dP @ bk
        dbk = dP.mT @ torch.cat([ae, re], -2)
        dae += d_aere[..., :Lc, :]
        dre += d_aere[..., Lc:, :]
        # the exponent factors: y = x ⊙ e^f gives dx = dy ⊙ e^f and df = dy ⊙ y
        pair = lambda x: x.unflatten(-2, (2, Lc))  # (.., 2Lc, N) -> (.., 2, Lc, N): the b and k halves
        dr, da = dre * e, dae * ep
        db, dk = (pair(dbk) * ie.unsqueeze(-3)).add_(pair(d_bdkd) * ed.unsqueeze(-3)).unbind(-3)
        d_ed = pair(d_bdkd * bdkd).sum(-3)       # dL/d(g_Lc - g)
        dgp = dae * ae                           # dL/d(g - lw)
        dg = torch.addcmul(dgp, dre, re).sub_(pair(dbk * bk).sum(-3)).sub_(d_ed)
        dg[..., -1:, :] += d_ed.sum(-2, keepdim=True) + de_last * e[..., -1:, :]
        dlw = dg.flip(-2).cumsum(-2).flip(-2) - dgp   # g_i = Σ_{j<=i} lw_j
        return dr, dk, dv, dlw, da, db, G[0]


def _wkv7_chunked(r, k, v, log_w, a, b, S, Lc):
    """Pad T to a multiple of Lc (a = b = k = 0, log_w = 0: padded tokens leave S as it is), lay the chunks out
    as (nc, B·H, Lc, N), run _Chunked7 on groups of chunks in order (the state passed on), put y back to (B, T, H, N)."""
    B, _, H, N = r.shape
    y, S = _in_groups(_Chunked7.apply, (r, k, v, log_w, a, b), S.reshape(B * H, N, N), Lc, S.dtype)
    return y, S.view(B, H, N, N)


def _wkv7_chunk_len(log_w, chunk_size, dt):
    """The longest chunk <= chunk_size whose factorised decays stay within e^{±_WKV7_SPAN} (see above)."""
    strongest = -log_w.detach().min().item()
    return chunk_size if strongest * chunk_size <= _WKV7_SPAN[dt] else int(_WKV7_SPAN[dt] // strongest)


@_fp32_math
def wkv7(r, k, v, log_w, a, b, state=None, backend=None, chunk_size=32):
    """(y, new_state) of the WKV7 recurrence S_t = (diag(w_t) + b_t a_tᵀ) S_{t-1} + k_t v_tᵀ, y_t = S_tᵀ r_t.

    Args:
        r, k, v, a, b: (B, T, H, N) in one dtype (fp32, bf16, fp16 or fp64).
        log_w: (B, T, H, N), <= 0, fp32 (or fp64): log of the per-channel decay w_t.
        state: (B, H, N, N) fp32 [key, value], or None for zeros.
        backend: "sequential" (per-token loop, the oracle), "chunked", "cuda" (the compiled forward kernel when no
            gradient is needed, as in wkv6; else chunked) or None (= "cuda" for GPU tensors when it compiled, else
            chunked; T == 1 is one step).
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
    mod = _cuda_kernels(backend, (*xs, state))
    if mod is not None:
        return _wkv_cuda(mod.wkv7_forward, r, k, v, log_w, *(x.to(r.dtype).contiguous() for x in (a, b)), S=S)
    if T == 1:  # decoding: one direct step
        y, S = _wkv7_step(*(x[:, 0].to(dt) for x in (r, k, v)), log_w[:, 0].to(dt).exp(),
                          a[:, 0].to(dt), b[:, 0].to(dt), S)
        return y.unsqueeze(1).to(r.dtype), S
    Lc = 1 if backend == "sequential" else _wkv7_chunk_len(log_w, chunk_size, dt)
    y, S = _wkv7_sequential(*xs, S) if Lc < 2 else _wkv7_chunked(*xs, S, Lc)
    return y.to(r.dtype), S
