"""Benchmarks of the QRWKV reference implementation; each section prints one table.

    python bench.py                 # every section
    python bench.py --only kernel   # WKV6 operator: chunked vs sequential (and the CUDA kernel on a GPU)
    python bench.py --only convert  # step-1 / step-2 training tokens/s vs the demo teacher's forward
    python bench.py --only decode   # decode latency after 128..16k tokens, converted vs teacher, state bytes
    python bench.py --only wkv7     # WKV7 operator (RWKV-7 student): chunked vs sequential
    python bench.py --only fsdp     # convert.py step 2 on 2 processes: per-process peak memory, DDP vs --fsdp

Timings are medians of repeated runs after a warm-up, wall clock.  Peak memory on CPU is the growth of
ru_maxrss in a fresh subprocess over its level once the inputs exist; on a GPU it is
torch.cuda.max_memory_allocated above the inputs.
"""
import argparse
import ctypes
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import qrwkv
from generate import prefill
from wkv_kernel import wkv6, wkv7

# ---------------------------------------------------------------------------------------------
# kernel: wkv6 backends, B=1, H=9, N=64
# ---------------------------------------------------------------------------------------------

KERNEL_SHAPE = dict(B=1, H=9, N=64)
SEQ_PREFIX = 2048  # the sequential loop runs on at most this many tokens


def cpu_flags(names=qrwkv.BF16_FLAGS + ("avx512f", "avx2")):
    """{flag: present} for the given CPU flags (qrwkv.auto_dtype picks bf16 only with a native bf16 one)."""
    flags = qrwkv.cpu_flags()
    return {n: n in flags for n in names}


def matmul_gflops(dtype, M=512, K=576, N=576, repeats=3, device="cpu"):
    """GFLOP/s of one (M, K) @ (K, N) matmul in dtype (2·M·K·N flops), median of `repeats` after a warm-up.
    The default is one demo projection on 512 tokens (small: emulated bf16 runs it at well under 1 GFLOP/s)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(*s, generator=g).to(device, dtype) for s in ((M, K), (K, N)))
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * M * K * N / statistics.median(times[1:]) / 1e9


def machine_line(device="cpu"):
    """One line: matmul GFLOP/s in fp32 and bf16, and whether the CPU has native bf16 (the flags)."""
    flags = ", ".join(f"{n} {'yes' if v else 'no'}" for n, v in cpu_flags().items())
    return (f"machine: matmul 512×576 @ 576×576 {matmul_gflops(torch.float32, device=device):,.1f} GFLOP/s fp32, "
            f"{matmul_gflops(torch.bfloat16, device=device):,.1f} GFLOP/s bf16; CPU flags: {flags}; "
            f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads")


def _kernel_inputs(T, dtype, device, grad):
    """r, k, v in dtype, log_w fp32 = max(-exp(raw), -5) as the model computes it."""
    g = torch.Generator().manual_seed(0)
    B, H, N = KERNEL_SHAPE.values()
    r, k, v = (0.5 * torch.randn(B, T, H, N, generator=g) for _ in range(3))
    log_w = (-torch.empty(B, T, H, N).uniform_(-6, 1.6, generator=g).exp()).clamp(min=-5)
    xs = [x.to(device, dt) for x, dt in zip((r, k, v, log_w), (dtype, dtype, dtype, torch.float32))]
    return [x.requires_grad_(grad) for x in xs]


def _kernel_step(backend, xs, train):
    """One forward (no grad), or forward + backward of a loss on y and the final state."""
    if not train:
        with torch.no_grad():
            return wkv6(*xs, backend=backend)
    y, S = wkv6(*xs, backend=backend)
    (y.float().square().mean() + S.square().mean()).backward()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _tokens_per_s(backend, T, dtype, device, train, repeats):
    """Median tokens/s over `repeats` timed runs after one warm-up run (64 tokens for the slow loop)."""
    xs = _kernel_inputs(T, dtype, device, train)
    _kernel_step(backend, [x[:, :64] for x in xs] if backend == "sequential" else xs, train)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        _kernel_step(backend, xs, train)
        _sync(device)
        times.append(time.perf_counter() - t)
    return T / statistics.median(times)


def _rss_kib(field):
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def _reset_peak_rss_kib():
    """Start a CPU peak-memory measurement: hand freed heap pages back to the OS (else a step that reuses them, e.g.
    the temporaries of building its inputs, shows no growth: wkv7's forward at T = 8192 read 0.0 MiB), reset VmHWM
    to VmRSS (/proc/self/clear_refs), and return VmRSS in KiB."""
    ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kib("VmRSS")


def _peak_mib_child(backend, T, dtype_name, device, train):
    """Run in a fresh process: peak memory (MiB) of one step above the memory held before it (after a
    64-token warm-up step).
    CPU: VmHWM minus VmRSS after _reset_peak_rss_kib; GPU: max_memory_allocated."""
    xs = _kernel_inputs(T, getattr(torch, dtype_name), device, train)
    _kernel_step(backend, [x[:, :64].detach().requires_grad_(train) for x in xs], train)  # lazy init
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _kernel_step(backend, xs, train)
        torch.cuda.synchronize()
        print((torch.cuda.max_memory_allocated() - base) / 2 ** 20)
    else:
        base = _reset_peak_rss_kib()
        _kernel_step(backend, xs, train)
        print((_rss_kib("VmHWM") - base) / 1024)


def _peak_mib(backend, T, dtype, device, train):
    """_peak_mib_child in a fresh subprocess."""
    code = (f"import bench; bench._peak_mib_child({backend!r}, {T}, {str(dtype).split('.')[1]!r}, "
            f"{device!r}, {train})")
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def bench_kernel(Ts=(512, 2048, 8192), repeats=3):
    """Tokens/s and peak memory of wkv6: chunked vs the sequential loop (and the CUDA kernel, forward
    only, on a GPU), B=1, H=9, N=64, fp32 and bf16 inputs."""
    rows = [("cpu", "sequential", True), ("cpu", "chunked", True)]
    if torch.cuda.is_available():
        rows += [("cuda", "sequential", True), ("cuda", "chunked", True), ("cuda", "cuda", False)]
    print(f"## wkv6 kernel  (B={KERNEL_SHAPE['B']}, H={KERNEL_SHAPE['H']}, N={KERNEL_SHAPE['N']}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__})\n\n{machine_line()}\n")
    goal = {}
    print("| dtype | T | device | backend | fwd tok/s | fwd+bwd tok/s | peak MiB fwd | peak MiB fwd+bwd "
          "| fwd ×seq | fwd+bwd ×seq |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x, f="{:,.0f}": "—" if x is None else f.format(x)
    for dtype in (torch.float32, torch.bfloat16):
        for T in Ts:
            seq = {}
            for device, backend, train in rows:
                slow = backend == "sequential"
                t = min(T, SEQ_PREFIX) if slow else T  # the loop runs on a prefix only
                fwd = _tokens_per_s(backend, t, dtype, device, False, repeats)
                both = _tokens_per_s(backend, t, dtype, device, True, 1 if slow else repeats) if train else None
                mem = [_peak_mib(backend, t, dtype, device, False),
                       _peak_mib(backend, t, dtype, device, True) if train else None]
                if slow:
                    seq[device] = (fwd, both)
                elif (dtype, T, device, backend) == (torch.float32, 2048, "cpu", "chunked"):
                    goal = dict(fwd=fwd / seq[device][0], both=both / seq[device][1])
                ratio = lambda a, b: None if a is None or b is None else a / b
                name = backend + ("*" if t < T else "")
                print(f"| {str(dtype)[6:]} | {T} | {device} | {name} | {fmt(fwd)} | {fmt(both)} | "
                      f"{fmt(mem[0], '{:,.1f}')} | {fmt(mem[1], '{:,.1f}')} | "
                      f"{fmt(ratio(fwd, seq[device][0]), '{:.1f}')} | {fmt(ratio(both, seq[device][1]), '{:.1f}')} |",
                      flush=True)
    print(f"\n\\* the sequential loop ran on the first {SEQ_PREFIX} tokens only (tokens/s and peak memory "
          f"are for that prefix).  The sequential forward+backward is one timed run after "
          f"a 64-token warm-up, every other figure the median of {repeats}.  ×seq = tokens/s over the sequential row "
          f"of the same dtype, T and device.  The cuda backend is forward-only (training uses chunked).")
    if goal:
        print(f"fp32, T=2048, chunked ÷ sequential: forward+backward {goal['both']:.1f}× (goal ≥ 20×), "
              f"forward {goal['fwd']:.1f}× (goal > 1×).\n")


# ---------------------------------------------------------------------------------------------
# convert: step-1 and step-2 training throughput vs the teacher's plain forward (demo teacher)
# ---------------------------------------------------------------------------------------------

def bench_convert(model_dir=None, batch=1, seq_len=512, repeats=3):
    """Tokens/s of convert.py's training micro-steps (forward + backward of its loss functions) next to the teacher's
    forward, one process: step 1 with a fresh teacher pass and from --cache1's kept targets; step 2 training everything
    and with --lr2_rest 0 (only the time-mix). In fp32 and, where the CPU has native bf16, as convert.py's bf16 runs
    them (bf16 teacher, student under bf16 autocast with fp32 master weights); also as a share of what the matmul
    FLOP count allows at that dtype's matmul rate."""
    model_dir = model_dir or DEMO_TEACHER
    dtypes = [torch.float32] + [torch.bfloat16] * (qrwkv.cpu_has_native_bf16() or torch.cuda.is_available())
    print(f"## conversion throughput ({model_dir}, B={batch} x T={seq_len}, {torch.get_num_threads()} threads, "
          f"median of {repeats} after a warm-up)\n\n{machine_line()}\n")
    rows = ("teacher forward", "step 1 (alignment, fresh teacher pass)", "step 1 (alignment, --cache1 targets)",
            "step 2 (distillation, everything trains)", "step 2 (distillation, --lr2_rest 0)")
    results = {dt: _convert_rates(model_dir, dt, batch, seq_len, repeats) for dt in dtypes}
    names = [str(dt).removeprefix("torch.") for dt in dtypes]
    print("| what | " + " | ".join(f"{n} tokens/s | {n} share of its teacher forward | {n} share of its FLOP bound" for n in names)
          + (" | bf16 ÷ fp32 |" if len(dtypes) > 1 else " |"))
    print("|---|" + "---|" * (3 * len(dtypes) + (len(dtypes) > 1)))
    for i, name in enumerate(rows):
        cells = [f"{results[dt][i][0]:,.0f} | {results[dt][i][0] / results[dt][0][0]:.0%} | {results[dt][i][1]:.0%}" for dt in dtypes]
        ratio = f" | {results[dtypes[-1]][i][0] / results[dtypes[0]][i][0]:.2f}×" if len(dtypes) > 1 else ""
        print(f"| {name} | " + " | ".join(cells) + ratio + " |", flush=True)
    print()


def _convert_rates(model_dir, dtype, batch, seq_len, repeats):
    """[(tokens/s, share of the FLOP bound)] of bench_convert's rows, in one compute dtype."""
    import argparse
    import convert
    t = qrwkv.load_model(model_dir, dtype=dtype).requires_grad_(False)
    x = torch.randint(t.config.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    student = convert.build_student(t, (), "cpu", None)
    run = argparse.Namespace(student=student, teacher=t, args=argparse.Namespace(kl_chunk=256, cache1=0), cache1={})
    P, P_mix = sum(p.numel() for p in t.parameters()), sum(p.numel() for b in student.model.layers for p in b.self_attn.parameters())
    flops = [2 * P, 2 * P + 6 * P_mix, 6 * P_mix, 2 * P + 6 * P, 2 * P + 4 * P + 2 * P_mix]

    def teacher_forward():
        with torch.no_grad():
            t(x[:, :-1])

    def step(n, loss, rest_scale=1.0, cached=False):
        def fn():
            convert.param_groups(student, n, rest_scale)
            run.args.cache1 = int(cached)
            with convert.student_autocast("cpu", dtype):
                out = loss(student, run, x, 0)
            out.backward()
            student.zero_grad(set_to_none=True)
        return fn

    rate = matmul_gflops(dtype, M=seq_len) * 1e9
    out = []
    for fn, f in zip((teacher_forward, step(1, convert.align_loss), step(1, convert.align_loss, cached=True),
                      step(2, convert.distill_loss), step(2, convert.distill_loss, rest_scale=0.0)), flops):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        tok_s = batch * seq_len / statistics.median(times)
        out.append((tok_s, tok_s * f / rate))
    return out


# ---------------------------------------------------------------------------------------------
# decode: per-token latency after long contexts, converted model (state) vs teacher (KV cache)
# ---------------------------------------------------------------------------------------------

DEMO_TEACHER = "data/smollm2-135m-instruct"


def _tiny_teacher():
    cfg = qrwkv.Config.from_dict(dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    torch.manual_seed(0)
    return qrwkv.QRWKV(cfg).eval()


@torch.inference_mode()
def _synthetic_state(model, ctx, gen):
    """A state as after ctx tokens, with random contents: KV caches of length ctx for attention layers, random
    (shift, kv) for time-mix layers. Decode latency depends only on these shapes, not on the values."""
    _, st = model(torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device))
    layers = []
    for entry, block in zip(st.layers, model.model.layers):
        if isinstance(block.self_attn, qrwkv.Attention):
            k, v = entry
            layers.append(tuple(torch.randn(k.shape[0], k.shape[1], ctx, k.shape[3], generator=gen).to(k) for _ in range(2)))
        else:
            layers.append(tuple(torch.randn(t.shape, generator=gen).to(t) * 0.1 for t in entry))
    return qrwkv.State(ctx, layers)


@torch.inference_mode()
def _decode_latencies(model, contexts, steps, warmup, prefill_chunk, seed=0, label=None, decode_threads=None,
                      synthetic_state=False):
    """{context: (median seconds per decoded token, state bytes)} for one model."""
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(V, (1, max(contexts)), generator=gen)
    out, state, pos = {}, None, 0
    for ctx in sorted(contexts):
        if synthetic_state:
            state = _synthetic_state(model, ctx, gen)
        else:
            _, state = prefill(model, ids[:, pos:ctx], state=state, chunk_size=prefill_chunk)
        pos = ctx
        s, tok, times = state, ids[:, ctx - 1:ctx], []
        threads = torch.get_num_threads()
        torch.set_num_threads(decode_threads or threads)
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            logits, s = model(tok, state=s)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        torch.set_num_threads(threads)
        out[ctx] = (statistics.median(times), state.nbytes())
        if label:
            print(f"  {label} after {ctx} tokens: {out[ctx][0] * 1e3:.2f} ms/token", flush=True)
    return out


def bench_decode(model_dir=None, student_dir=None, contexts=(128, 1024, 4096, 16384), steps=16, warmup=4,
                 prefill_chunk=2048, dtype=None, device="cpu", teacher=True, verbose=True, decode_threads=1,
                 synthetic_state=True):
    """Decode latency table: converted model vs teacher with KV cache. Returns a list of rows
    {context, student_ms, teacher_ms, student_state_bytes, teacher_kv_bytes}.
    decode_threads: torch threads while timing decode steps (prefill uses all). Batch-1 decode is many tiny ops;
    on a shared 2-core machine two OpenMP threads per op made each step 3-20x slower and erratic, 1 is stable.
    synthetic_state: skip the prefill and decode from a random state/KV cache of the right shape (latency
    depends only on shapes) -- the default; a real prefill to 16k takes 30-55 minutes on 2 CPU cores.
    dtype None: qrwkv.auto_dtype's choice for the device (fp32 on CPUs without native bf16)."""
    dtype, why = qrwkv.auto_dtype(device) if dtype is None else (dtype, "given")
    if model_dir is None and os.path.isdir(DEMO_TEACHER):
        model_dir = DEMO_TEACHER
    t = qrwkv.load_model(model_dir, dtype=dtype, device=device) if model_dir else _tiny_teacher().to(device, dtype)
    s = qrwkv.load_model(student_dir, dtype=dtype, device=device) if student_dir else qrwkv.student_from_teacher(t).eval()
    name = model_dir or "tiny random teacher"
    if verbose:
        print(f"decode latency: {name} ({t.config.num_hidden_layers} layers, C {t.config.hidden_size}), "
              f"{dtype} ({why}), decode on {decode_threads or torch.get_num_threads()} thread(s), median of {steps} steps after "
              f"{warmup} warm-up, " + ("synthetic states" if synthetic_state else f"prefill in chunks of {prefill_chunk}"), flush=True)
    kw = dict(decode_threads=decode_threads, synthetic_state=synthetic_state)
    # synthetic states: the two models alternate context by context, so a change in a shared machine's load
    # hits both sides of each ratio (a real prefill carries its state from one context to the next instead)
    res_s, res_t = {}, {}
    for cs in ([[c] for c in sorted(contexts)] if synthetic_state else [sorted(contexts)]):
        res_s.update(_decode_latencies(s, cs, steps, warmup, prefill_chunk, label="converted" if verbose else None, **kw))
        if teacher:
            res_t.update(_decode_latencies(t, cs, steps, warmup, prefill_chunk, label="teacher" if verbose else None, **kw))
    rows = [dict(context=c, student_ms=res_s[c][0] * 1e3, student_state_bytes=res_s[c][1],
                 teacher_ms=res_t[c][0] * 1e3 if c in res_t else None,
                 teacher_kv_bytes=res_t[c][1] if c in res_t else None) for c in sorted(contexts)]
    if verbose:
        print(f"{'context':>8} | {'converted ms/tok':>16} | {'teacher ms/tok':>14} | {'speedup':>7} | "
              f"{'state bytes':>12} | {'KV-cache bytes':>14}")
        for r in rows:
            tm = r["teacher_ms"]
            print(f"{r['context']:>8} | {r['student_ms']:>16.2f} | "
                  + (f"{tm:>14.2f} | {tm / r['student_ms']:>6.2f}x | " if tm is not None else f"{'-':>14} | {'-':>7} | ")
                  + f"{r['student_state_bytes']:>12,} | " + (f"{r['teacher_kv_bytes']:>14,}" if tm is not None else f"{'-':>14}"))
        first, last = rows[0], rows[-1]
        print(f"converted latency at {last['context']} / at {first['context']}: {last['student_ms'] / first['student_ms']:.3f} "
              f"(goal <= 1.10); state bytes constant: {len(set(r['student_state_bytes'] for r in rows)) == 1}"
              + ("; faster than the teacher at contexts >= 4096: "
                 + str(all(r['student_ms'] < r['teacher_ms'] for r in rows if r['context'] >= 4096)) if teacher else ""))
        if teacher:
            print(f"converted ÷ teacher per-token speed: {first['teacher_ms'] / first['student_ms']:.2f}× at {first['context']} "
                  f"(goal ≥ 1×), {last['teacher_ms'] / last['student_ms']:.2f}× at {last['context']} (goal ≥ 5×)")
    return rows


# ---------------------------------------------------------------------------------------------
# wkv7: the RWKV-7 operator of the rwkv7qwen2 student, chunked vs sequential, B=1, H=9, N=64, fp32
# ---------------------------------------------------------------------------------------------

WKV7_GOAL_T = 2048   # the RWKV-7 issue's goal: chunked forward + backward >= 10x the per-token loop at this T


def _wkv7_inputs(T, grad):
    """Inputs of the released parameterisation: log_w = -e^{-1/2} σ(z), a = -κ̂, b = κ̂ ⊙ iclr."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda: torch.randn(KERNEL_SHAPE["B"], T, KERNEL_SHAPE["H"], KERNEL_SHAPE["N"], generator=g)
    r, k, v = 0.5 * rnd(), 0.5 * rnd(), 0.5 * rnd()
    log_w = -math.exp(-0.5) * torch.sigmoid(2 * rnd())
    kk, iclr = F.normalize(rnd(), dim=-1), torch.sigmoid(rnd())
    return [x.requires_grad_(grad) for x in (r, k, v, log_w, -kk, kk * iclr)]


def _wkv7_step(xs, train, **kw):
    """One forward (no grad), or forward + backward of a loss on y and the final state."""
    if not train:
        with torch.no_grad():
            return wkv7(*xs, **kw)
    y, S = wkv7(*xs, **kw)
    (y.square().mean() + S.square().mean()).backward()


def _wkv7_tokens_per_s(T, train, repeats, **kw):
    """Median tokens per CPU second of this process (time.process_time) over `repeats` runs after a 64-token
    warm-up: on a shared machine wall clock measured the other tenants (ratios between two runs varied 1x-15x)."""
    xs = _wkv7_inputs(T, train)
    _wkv7_step([x[:, :64] for x in xs], train, **kw)
    times = []
    for _ in range(repeats):
        t = time.process_time()
        _wkv7_step(xs, train, **kw)
        times.append(time.process_time() - t)
    return T / statistics.median(times)


def _wkv7_peak_mib_child(T, train, kw):
    """In a fresh process: growth of VmHWM over VmRSS (_reset_peak_rss_kib) during one step, MiB."""
    xs = _wkv7_inputs(T, train)
    _wkv7_step([x[:, :64].detach().requires_grad_(train) for x in xs], train, **kw)
    base = _reset_peak_rss_kib()
    _wkv7_step(xs, train, **kw)
    print((_rss_kib("VmHWM") - base) / 1024)


def _wkv7_peak_mib(T, train, kw):
    code = f"import bench; bench._wkv7_peak_mib_child({T}, {train}, {kw!r})"
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def bench_wkv7(Ts=(512, 2048, 8192), chunk_sizes=(16, 32, 64), repeats=3):
    """Tokens per CPU second and peak memory of wkv7, fp32, CPU, one thread: the chunked form (default chunk, and
    other chunk sizes at T = 2048) vs the per-token loop at WKV7_GOAL_T (median of at least 5 runs: its CPU time
    varied 0.4k-3.4k tokens/s between runs of one process on the shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of one thread: comparable between rows on a shared machine
    print(f"## wkv7 kernel  (B={KERNEL_SHAPE['B']}, H={KERNEL_SHAPE['H']}, N={KERNEL_SHAPE['N']}, fp32, cpu, "
          f"1 thread, torch {torch.__version__})\n")
    print("| T | backend | fwd tok/CPU-s | fwd+bwd tok/CPU-s | peak MiB fwd | peak MiB fwd+bwd | fwd ×seq | fwd+bwd ×seq |")
    print("|---|---|---|---|---|---|---|---|")
    t, seq_repeats = WKV7_GOAL_T, max(repeats, 5)
    seq = [_wkv7_tokens_per_s(t, train, seq_repeats, backend="sequential") for train in (False, True)]
    mem = [_wkv7_peak_mib(t, train, dict(backend="sequential")) for train in (False, True)]
    print(f"| {t} | sequential | {seq[0]:,.0f} | {seq[1]:,.0f} | {mem[0]:,.1f} | {mem[1]:,.1f} | 1.0 | 1.0 |", flush=True)
    default = inspect.signature(wkv7).parameters["chunk_size"].default
    runs = [(T, default) for T in Ts] + [(t, c) for c in chunk_sizes if c != default and t in Ts]
    goal = {}
    for T, c in runs:
        kw = dict(chunk_size=c)
        fwd, both = (_wkv7_tokens_per_s(T, train, repeats, **kw) for train in (False, True))
        mem = [_wkv7_peak_mib(T, train, kw) for train in (False, True)]
        print(f"| {T} | chunked ({c}) | {fwd:,.0f} | {both:,.0f} | {mem[0]:,.1f} | {mem[1]:,.1f} | "
              f"{fwd / seq[0]:.1f} | {both / seq[1]:.1f} |", flush=True)
        if T == t:
            goal[c] = both / seq[1]
    torch.set_num_threads(threads)
    if goal:
        print(f"\nchunked forward + backward at T = {t}: {max(goal.values()):.1f}× the loop at its best chunk "
              f"({max(goal, key=goal.get)}; goal ≥ 10×)")
    print(f"\nEvery row is the median of {repeats} runs ({seq_repeats} for the loop) after a 64-token warm-up, in tokens per CPU second of the process.  ×seq = tokens/s over the sequential "
          f"row.  Chunk size in parentheses.\n")



# ---------------------------------------------------------------------------------------------
# fsdp: per-process peak memory of one convert.py step-2 step, DDP vs --fsdp, 2 processes
# ---------------------------------------------------------------------------------------------

# a random Qwen2-like teacher of 53M parameters (untied); its student has 59M
FSDP_TEACHER = dict(model_type="qwen2", vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                    num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False, eos_token_id=0)


def _fsdp_teacher_dir(path):
    """The random teacher as a Hugging Face directory (config.json, model.safetensors, a one-token tokenizer.json)."""
    from tokenizers import Tokenizer, models
    torch.manual_seed(0)
    qrwkv.save_model(qrwkv.QRWKV(qrwkv.Config.from_dict(FSDP_TEACHER)), path)
    Tokenizer(models.WordLevel({"<eos>": 0}, unk_token="<eos>")).save(os.path.join(path, "tokenizer.json"))


def _fsdp_child(teacher_dir, fsdp, B, T, steps):
    """One torchrun process: convert.py's own teacher loading, student building and wrapping (DDP or --fsdp), then
    `steps` step-2 optimizer steps (distill_loss, clip, AdamW over everything); rank 0 prints one JSON line with every
    process's peak RSS per step above its RSS after init_process_group (VmHWM reset before each step) and step times."""
    import types
    import torch.distributed as dist
    import convert
    args = convert.get_args(["--teacher", teacher_dir, "--calibrate", "0", "--kl_chunk", "256"] + (["--fsdp"] if fsdp else []))
    d, device = convert.Dist(), torch.device("cpu")
    torch.set_num_threads(1)
    d.start(device)
    base = _rss_kib("VmRSS")
    sharding = convert.fsdp_setup(args, d, device, torch.float32)
    teacher = convert.load_teacher(teacher_dir, device, torch.float32, sharding)
    torch.manual_seed(0)
    student = convert.build_student(teacher, (), device, None)
    run = types.SimpleNamespace(args=args, d=d, device=device, teacher=teacher, student=student)   # what the pieces read
    model = convert.data_parallel(run, student)
    optimizer = torch.optim.AdamW(convert.param_groups(student, 2, 1.0), lr=1e-5)
    x = torch.randint(teacher.config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(d.rank))
    peaks, times = [], []
    for _ in range(steps):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        t0 = time.perf_counter()
        convert.distill_loss(model, run, x, None).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        peaks.append((_rss_kib("VmHWM") - base) / 1024)
    rows = [None] * d.world
    dist.all_gather_object(rows, dict(peaks=peaks, times=times, base=base / 1024, local=[convert.local_numel(m) for m in (teacher, student)]))
    if d.master:
        print(json.dumps(rows))
    d.close(True)


# the Qwen2.5 teachers of the seeds (their config.json numbers); all untied, q/k/v biases (qwen2)
QWEN25 = {"7B": (3584, 18944, 28, 28, 4), "32B": (5120, 27648, 64, 40, 8), "72B": (8192, 29568, 80, 64, 8)}


def fsdp_memory_table(tokens=2048, kl_chunk=256, gpus=(8, 16), memories=(80, 141, 192)):
    """Per-GPU memory of convert.py --fsdp for Qwen2.5-7B/32B/72B, from exact parameter counts of teacher and student
    built on the meta device. Sharded state per GPU (N GPUs): teacher bf16 2·P_t/N + student fp32 masters 4·P_s/N +
    fp32 gradient and AdamW m, v of what trains 12·P_train/N (step 1: the time-mix blocks; step 2: everything).
    Working set W (an estimate, unsharded, per GPU, `tokens` per micro-batch, --activation_checkpointing): two
    gathered bf16 blocks of each model and one block's fp32 gradient; the block inputs kept by checkpointing
    (L·tokens·C bf16) and one block's recompute; step 1: the teacher's mixer inputs and outputs of every layer
    (2·L·tokens·C bf16); step 2: both heads gathered for the KL (bf16) + the student head's fp32 gradient and the
    KL chunk's logits. Fits: state + W <= 90% of the GPU. DDP needs 2·P_t + 20·P_s on every GPU (+ buckets)."""
    rows = []
    for name, (C, I, L, H, Hk) in QWEN25.items():
        cfg = qrwkv.Config.from_dict(dict(model_type="qwen2", vocab_size=152064, hidden_size=C, intermediate_size=I,
                                          num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=Hk))
        with torch.device("meta"):
            teacher = qrwkv.QRWKV(cfg)
            student = qrwkv.student_from_teacher(teacher)
        count = lambda ps: sum(p.numel() for p in ps)
        Pt, Ps = count(teacher.parameters()), count(student.parameters())
        Ptm = count(p for b in student.model.layers for p in b.self_attn.parameters())
        blk_t, blk_s, V = count(teacher.model.layers[0].parameters()), count(student.model.layers[0].parameters()), cfg.vocab_size
        for stage, trained in ((1, Ptm), (2, Ps)):
            W = 2 * 2 * (blk_t + blk_s) + 4 * (blk_s if stage == 2 else Ptm // L) + L * tokens * C * 2 + tokens * (3 * I + 10 * C) * 4
            W += 2 * L * tokens * C * 2 if stage == 1 else 8 * V * C + 4 * kl_chunk * V * 4
            for n in gpus:
                state = (2 * Pt + 4 * Ps + 12 * trained) / n
                rows.append((name, Pt, Ps, Ptm, stage, n, state / 1e9, W / 1e9,
                             ["yes" if state + W <= 0.9 * m * 1e9 else "no" for m in memories]))
    print(f"## convert.py --fsdp memory per GPU, Qwen2.5 teachers (GB = 1e9 B; W at {tokens} tokens per micro-batch; "
          f"fits = state + W <= 90% of the GPU)\n")
    print("| teacher | P_teacher | P_student | P_time-mix | step | GPUs | sharded state / GPU | + W (estimate) | "
          + " | ".join(f"{m} GB" for m in memories) + " |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(memories))
    for name, Pt, Ps, Ptm, stage, n, state, W, fits in rows:
        print(f"| {name} | {Pt / 1e9:.2f}B | {Ps / 1e9:.2f}B | {Ptm / 1e9:.2f}B | {stage} | {n} | {state:.1f} | {W:.1f} | "
              + " | ".join(fits) + " |")
    print()
    return rows


def bench_fsdp(B=1, T=256, steps=3):
    """convert.py step 2 on 2 processes, DDP (a whole teacher and student per process) vs --fsdp (both sharded): peak
    memory per process of one step once AdamW's state exists (the steps after the first) and the step time, fp32,
    1 thread per process. MALLOC_MMAP_THRESHOLD_=65536 makes glibc return freed blocks to the OS; without it FSDP's
    per-step gather/free churn stays resident and RSS shows no gain (notes/fsdp2.md §2.2)."""
    import tempfile
    fsdp_memory_table()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        _fsdp_teacher_dir(tmp)
        n_teacher = sum(t.numel() for t in qrwkv.load_model(tmp).parameters())
        for name, fsdp in (("DDP", False), ("--fsdp", True)):
            code = f"import bench; bench._fsdp_child({tmp!r}, {fsdp}, {B}, {T}, {steps})"
            out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                  "--no-python", sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                                 env=env, capture_output=True, text=True, timeout=1200)
            if out.returncode:
                raise RuntimeError(out.stderr[-3000:])
            res[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"## convert.py step 2 on 2 processes: DDP vs --fsdp (teacher {n_teacher / 1e6:.1f}M parameters, B={B} x T={T}, "
          f"fp32, 1 thread each, MALLOC_MMAP_THRESHOLD_=65536; steps 2..{steps}, medians)\n")
    print("| layout | teacher / student params held per process | peak per process above its start (MiB) | step time (s) |")
    print("|---|---|---|---|")
    summary = {}
    for name, rows in res.items():
        peak = max(statistics.median(r["peaks"][1:]) for r in rows)
        t = statistics.median(statistics.median(r["times"][1:]) for r in rows)
        summary[name] = (peak, t)
        peaks = " / ".join(f"{statistics.median(r['peaks'][1:]):,.0f}" for r in rows)
        print(f"| {name} | {rows[0]['local'][0] / 1e6:.1f}M / {rows[0]['local'][1] / 1e6:.1f}M | {peaks} | {t:.2f} |")
    ratio = summary["--fsdp"][0] / summary["DDP"][0]
    print(f"\n--fsdp / DDP: peak per process {ratio:.2f}x (goal <= 0.6x: {'met' if ratio <= 0.6 else 'NOT met'}), "
          f"step time {summary['--fsdp'][1] / summary['DDP'][1]:.2f}x.  Both processes share this machine's cores.\n")
    return summary

SECTIONS = {"kernel": bench_kernel, "convert": bench_convert, "decode": bench_decode, "wkv7": bench_wkv7,
            "fsdp": bench_fsdp}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(SECTIONS), help="run one section")
    args = p.parse_args()
    for name, fn in SECTIONS.items():
        if args.only in (None, name):
            fn()


if __name__ == "__main__":
    main()
