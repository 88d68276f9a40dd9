"""WKV6: the RWKV-6 linear-attention recurrence, as one operator with three backends.

Per batch and head, with a state S of shape (N, N) indexed [key, value] and per-channel decay
w_t = exp(log_w_t) in (0, 1]:

    S_t = diag(w_t) · S_{t-1} + k_tᵀ v_t

    u is None (QRWKV6, `rwkv6qwen2`):  y_t = r_t · S_t = (r_t ⊙ w_t) · S_{t-1} + (r_t · k_t) v_t
    u given   (classic RWKV-6):        y_t = r_t · S_{t-1} + (r_t ⊙ u · k_t) v_t

There is no N^(-1/2) factor in here: the QRWKV6 model scales r itself before calling wkv6.

    wkv6(r, k, v, log_w, u=None, state=None, backend=None, chunk_size=32, subchunk_size=8)
        -> (y, new_state)

r, k, v, log_w: (B, T, H, N).  log_w <= 0, fp32, computed by the caller straight from the raw decay
(log_w = -exp(raw), clamped); never log(w), which rounds to log(1.0) = 0 for raw < -17.
u: (H, N).  state: (B, H, N, N) fp32, None = zeros.  y has r's dtype, new_state is fp32 (fp64 for
fp64 inputs); all accumulation is fp32 or wider.

Backends:
  "sequential"  per-token loop; the test oracle (also runs in fp64).
  "chunked"     exact and stable chunked form (SPEC §4), autograd, O(T) saved memory.  Default on CPU.
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
from torch.utils.checkpoint import checkpoint

BACKENDS = ("sequential", "chunked", "cuda")
_CKPT_TOKENS = 1024  # chunks are checkpointed in groups of this many tokens: bounds backward's peak memory


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
# Chunked form.  Inside a chunk, c_i = Σ_{j<=i} log_w_j restarts at the chunk start, and the
# decay seen by the query is g_i = c_i (QRWKV6: r⊙w_t reads S_{t-1}) or c_{i-1} (classic), so
#   y_i = (r_i ⊙ e^{g_i}) · S0 + Σ_{j<i} Σ_n r_in k_jn e^{g_in - c_jn} v_j + (b_i · k_i) v_i
# with b = r (QRWKV6) or r ⊙ u (classic).  Every exponent used below is <= 0.
# Tensors: (..., L, N) with ... = (B, H, chunks).
# ---------------------------------------------------------------------------------------------

def _chunk_states(k, v, c, S):
    """Initial state of every chunk and the final state.  Per chunk (parallel):
    decay = e^{c_last}, dS = Σ_j (k_j ⊙ e^{c_last - c_j})ᵀ v_j; then sequentially S <- decay ⊙ S + dS."""
    c_last = c[..., -1:, :]
    dS = (k * (c_last - c).exp()).transpose(-1, -2) @ v  # (B, H, nc, N, N)
    decay = c_last.exp().transpose(-1, -2)  # (B, H, nc, N, 1), scales the key rows
    starts = []
    for decay_i, dS_i in zip(decay.unbind(2), dS.unbind(2)):  # unbind: backward stacks the gradients once
        starts.append(S)
        S = decay_i * S + dS_i
    return torch.stack(starts, 2), S


def _inter_and_offdiag(r, k, v, g, c, S0, Ls):
    """Inter-chunk term (r_i ⊙ e^{g_i}) · S0 plus the off-diagonal sub-blocks, with the reference
    point cref = c just before query sub-chunk I (0 for I = 0):
    A[i, j] = (r_i ⊙ e^{g_i - cref}) · (k_j ⊙ e^{cref - c_j}) for keys j before sub-chunk I."""
    L, nS = r.shape[-2], r.shape[-2] // Ls
    y = (r * g.exp()) @ S0
    sub = lambda x: x.unflatten(-2, (nS, Ls))  # (..., nS, Ls, N)
    cref = F.pad(sub(c)[..., :-1, -1, :], (0, 0, 1, 0)).unsqueeze(-2)  # (..., nS, 1, N)
    before = torch.arange(L, device=r.device) < Ls * torch.arange(nS, device=r.device)[:, None]
    ek = torch.where(before[:, :, None], cref - c.unsqueeze(-3), -torch.inf).exp()  # (..., nS, L, N)
    A = (sub(r) * (sub(g) - cref).exp()) @ (k.unsqueeze(-3) * ek).transpose(-1, -2)  # (..., nS, Ls, L)
    return y + (A @ v.unsqueeze(-3)).flatten(-3, -2)


def _pair_decay(g, c):
    """E[i, j, n] = e^{g_in - c_jn} for j < i, 0 otherwise (masked to -inf before exp); (..., Ls, Ls, N)."""
    Ls = g.shape[-2]
    upper = torch.ones(Ls, Ls, dtype=torch.bool, device=g.device).triu()[:, :, None]
    return (g.unsqueeze(-2) - c.unsqueeze(-3)).masked_fill_(upper, -torch.inf).exp_()


class _PairScores(torch.autograd.Function):
    """A[i, j] = Σ_n r_in k_jn E_ijn within each sub-chunk (the diagonal sub-blocks).  Only the
    (..., Ls, N) inputs are saved; backward rebuilds E and, with M = dA ⊙ E, uses
    dr = Σ_j M k_j,  dk = Σ_i M r_i,  dg = r ⊙ dr,  dc = -k ⊙ dk."""

    @staticmethod
    def forward(ctx, r, k, g, c):
        ctx.save_for_backward(r, k, g, c)
        return (_pair_decay(g, c).mul_(k.unsqueeze(-3)) @ r.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, dA):
        r, k, g, c = ctx.saved_tensors
        M = _pair_decay(g, c).mul_(dA.unsqueeze(-1))
        dr = (M * k.unsqueeze(-3)).sum(-2)
        dk = M.mul_(r.unsqueeze(-2)).sum(-3)
        return dr, dk, r * dr, -k * dk


def _wkv6_chunked(r, k, v, log_w, u, S, L, Ls):
    """Pad T to a multiple of L (log_w = 0, k = 0: the final state stays exact); pass state over
    chunks sequentially; then all chunks in parallel: inter-chunk + off-diagonal sub-blocks
    (checkpointed in groups of chunks), diagonal sub-blocks (_PairScores) and the current token."""
    if L % Ls:
        raise ValueError(f"chunk_size {L} must be a multiple of subchunk_size {Ls}")
    T, dt, pad = r.shape[1], S.dtype, -r.shape[1] % L
    prep = lambda x: F.pad(x.to(dt).transpose(1, 2), (0, 0, 0, pad)).unflatten(2, (-1, L))
    r, k, v, log_w = map(prep, (r, k, v, log_w))  # (B, H, nc, L, N)
    c = log_w.cumsum(-2)
    g = c if u is None else F.pad(c, (0, 0, 1, 0))[..., :-1, :]  # classic: exact exclusive cumsum
    S0, S = _chunk_states(k, v, c, S)

    G = max(1, _CKPT_TOKENS // L)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (r, k, v, c, S0))
    ys = []
    for i in range(0, r.shape[2], G):
        part = [x[:, :, i:i + G] for x in (r, k, v, g, c, S0)]
        ys.append(checkpoint(_inter_and_offdiag, *part, Ls, use_reentrant=False) if grad
                  else _inter_and_offdiag(*part, Ls))
    y = torch.cat(ys, 2)

    sub = lambda x: x.unflatten(-2, (-1, Ls))
    y = y + (_PairScores.apply(sub(r), sub(k), sub(g), sub(c)) @ sub(v)).flatten(-3, -2)
    b = r if u is None else r * u.to(dt)[:, None, None, :]  # current token: (b_i · k_i) v_i
    y = y + (b * k).sum(-1, keepdim=True) * v
    return y.flatten(2, 3)[:, :, :T].transpose(1, 2), S


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

def wkv6(r, k, v, log_w, u=None, state=None, backend=None, chunk_size=32, subchunk_size=8):
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
    if backend == "sequential":
        y, S = _wkv6_sequential(r, k, v, log_w, u, S)
    else:
        y, S = _wkv6_chunked(r, k, v, log_w, u, S, chunk_size, subchunk_size)
    return y.to(r.dtype), S
