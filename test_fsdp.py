"""Tests of `convert.py --fsdp` (FSDP2 sharding, SPEC §8) on CPU with gloo, on the tiny random teachers of conftest.py's
`world` fixture (a tied Llama, an untied Qwen2):

    python -m pytest -q test_fsdp.py

2-process runs are torchrun subprocesses with a timeout, so a hang (a collective one process never joins) fails in
minutes, not never; 1-process runs are in-process (--fsdp makes its own process group of one).
Tolerance: sharded and replicated runs differ only in the order of floating-point reductions; AdamW magnifies that
on near-zero gradients (notes/fsdp2.md P11), so losses and gradient norms are compared to 1e-5 relative and weights
to 1e-4 absolute; a kill-and-resume with the same layout is compared exactly.
"""
import json
import os
import re
import shutil

import pytest
import torch

import qrwkv
from test_convert import FAST, cli, error_of, inproc, train_losses

RTOL, WTOL = 1e-5, 2.5e-4   # weights: one AdamW step moves them by ~lr (1e-3 here), a wrong or missing update shows
TIMEOUT = 240


def records(out):
    """{(stage, step): (loss, grad_norm)} of the training steps; a step logged twice keeps its last values."""
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {(r["stage"], r["step"]): (r["loss"], r["grad_norm"]) for r in recs if r["kind"] == "train"}


def assert_close(a: dict, b: dict, rtol=RTOL):
    assert sorted(a) == sorted(b)
    for k in a:
        for x, y in zip(a[k], b[k]):
            assert abs(x - y) <= rtol * max(1.0, abs(x)), (k, a[k], b[k])


def assert_same_model(dir_a, dir_b, atol=WTOL):
    a, b = qrwkv.load_model(str(dir_a)).state_dict(), qrwkv.load_model(str(dir_b)).state_dict()
    assert sorted(a) == sorted(b)
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst <= atol, worst


def run2(args, out):
    r = cli(args + ["--out", out], nproc=2, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def with_batch(args, B):
    args = list(args)
    args[args.index("--batch_size") + 1] = str(B)
    return args


def test_fsdp_equals_one_process_and_ddp(world, tmp_path, monkeypatch):
    """Tied Llama teacher, hybrid (layer 1 stays attention), steps 1, 2 and 3 with real learning rates: 2 processes x B 2
    under --fsdp == 1 process x B 4 under --fsdp == 2 processes x B 2 under DDP, every step's loss and gradient norm,
    and the saved models (the 1-process one written in several safetensors files, gathered a tensor at a time)."""
    base = ["--teacher", world["llama"], "--data", world["data"], *with_batch(FAST, 2), "--calibrate", 0, "--steps1", 3,
            "--steps2", 3, "--lr1", 1e-2, "--warmup1", 1, "--lr2", 1e-3, "--min_lr2", 1e-3, "--warmup2", 1,
            "--attention_layers", 1, "--eval_tokens", 0, "--steps3", 1, "--seq_len3", 64, "--batch_size3", 1]
    log = run2(base + ["--fsdp"], tmp_path / "fsdp2")
    line = next(x for x in log.splitlines() if x.startswith("--fsdp: process 0 holds"))
    held = [int(w.replace(",", "")) for w in re.findall(r"\d[\d,]*", line)][1:]   # teacher: local, total; student: same
    assert held[0] <= 0.6 * held[1] and held[2] <= 0.6 * held[3], line          # no process holds a whole model
    run2(base, tmp_path / "ddp2")
    monkeypatch.setattr("convert.FINAL_SHARD_BYTES", 100_000)
    one = with_batch(base, 4)
    one[one.index("--batch_size3") + 1] = "2"
    inproc(one + ["--fsdp", "--out", tmp_path / "fsdp1"])
    index = json.loads((tmp_path / "fsdp1" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "fsdp1" / "model.safetensors").exists()
    fsdp2, fsdp1, ddp2 = records(tmp_path / "fsdp2"), records(tmp_path / "fsdp1"), records(tmp_path / "ddp2")
    assert len(fsdp2) == 7 and len({v[0] for v in fsdp2.values()}) == 7
    assert_close(fsdp2, fsdp1)
    assert_close(fsdp2, ddp2)
    assert_same_model(tmp_path / "fsdp2", tmp_path / "fsdp1")
    assert_same_model(tmp_path / "fsdp2", tmp_path / "ddp2")
    for f in ("config.json", "tokenizer.json"):
        assert json.loads((tmp_path / "fsdp2" / f).read_text()) == json.loads((tmp_path / "ddp2" / f).read_text()), f
    student = qrwkv.load_model(str(tmp_path / "fsdp2"))
    assert isinstance(student.model.layers[1].self_attn, qrwkv.Attention)
    assert isinstance(student.model.layers[0].self_attn, qrwkv.TimeMix)


def test_fsdp_resume_exact_and_other_world_size(world, tmp_path):
    """Untied Qwen2 teacher, evaluation on: a 1-process --fsdp run stopped inside step 2 and resumed (with activation
    checkpointing, which must not change a bit) equals the uninterrupted run exactly; a checkpoint written by 2
    processes resumes on 1 process and, as HSDP (2 replicas x 1 shard), on 2, both continuing the same losses."""
    args = ["--teacher", world["qwen"], "--data", world["data"], *FAST, "--calibrate", 0, "--steps1", 2, "--steps2", 2,
            "--lr1", 1e-2, "--warmup1", 1, "--lr2", 1e-3, "--min_lr2", 1e-3, "--warmup2", 1, "--eval_tokens", 128, "--fsdp"]
    inproc(args + ["--out", tmp_path / "full"])
    cut = args + ["--out", tmp_path / "cut"]
    inproc(cut + ["--stop_after", 3])                       # step 1 done (2), then step 2's first step
    ck = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)
    assert (ck["stage"], ck["step"]) == (2, 1) and "model" not in ck and "optimizer" not in ck
    assert sorted(n for n in os.listdir(tmp_path / "cut") if n.startswith("ckpt-")) == [ck["sharded"]["dir"]]
    assert "written with --fsdp" in error_of([a for a in cut if a != "--fsdp"] + ["--resume"])
    inproc(cut + ["--resume", "--activation_checkpointing"])
    full = records(tmp_path / "full")
    assert records(tmp_path / "cut") == full and len(full) == 4
    assert_same_model(tmp_path / "full", tmp_path / "cut", atol=0)
    # written by 2 processes (B 2 each: the same global batch), resumed by 1 (B 4) and by 2 as HSDP
    two = with_batch(args, 2) + ["--out", tmp_path / "two"]
    run2(two + ["--stop_after", 3], tmp_path / "two")
    shutil.copytree(tmp_path / "two", tmp_path / "two_hsdp")
    inproc(with_batch(args, 4) + ["--out", tmp_path / "two", "--resume"])
    log = run2(with_batch(args, 2) + ["--resume", "--hsdp", 2], tmp_path / "two_hsdp")
    assert "mesh {'replicate': 2, 'shard': 1}" in log
    for out in ("two", "two_hsdp"):
        assert_close(records(tmp_path / out), full)
        assert_same_model(tmp_path / "full", tmp_path / out)
    assert train_losses(tmp_path / "two").keys() == train_losses(tmp_path / "full").keys()


def test_fsdp_refusals(world, tmp_path):
    args = ["--teacher", world["llama"], "--data", world["data"], "--out", tmp_path / "o", *FAST]
    assert "--hsdp needs --fsdp" in error_of(args + ["--hsdp", 2])
    assert "--activation_checkpointing needs --fsdp" in error_of(args + ["--activation_checkpointing"])
    assert "pass --calibrate 0" in error_of(args + ["--fsdp", "--calibrate", 4])
    assert "must divide the number of processes (1)" in error_of(args + ["--fsdp", "--calibrate", 0, "--hsdp", 2])


def test_fsdp_rwkv7_student_equals_ddp(world, tmp_path):
    """--student rwkv7 (layer 0's values feed every later layer's value residual, across FSDP units), hybrid with the
    last layer kept as attention, steps 1 and 2, 2 processes: --fsdp with --activation_checkpointing == --fsdp exactly,
    and == DDP in every step's loss (1e-5 relative), gradient norm and the saved rwkv7qwen2 model.  Gradient norms get
    1e-4: from the SPEC init many RWKV-7 gradients start near zero (gate g1 = 0), where AdamW turns a reduction-order
    difference into a full-lr step (measured: 4.4e-5 against DDP, 3.5e-4 against 1 process x B 4, which sums in yet
    another order; FSDP with and without checkpointing bit-identical)."""
    base = ["--teacher", world["qwen"], "--data", world["data"], *with_batch(FAST, 2), "--student", "rwkv7",
            "--calibrate", 0, "--steps1", 3, "--steps2", 3, "--lr1", 1e-2, "--warmup1", 1, "--lr2", 1e-3, "--min_lr2", 1e-3,
            "--warmup2", 1, "--attention_layers", 2, "--eval_tokens", 0]
    for name, extra in (("fsdp", ["--fsdp"]), ("fsdp_ac", ["--fsdp", "--activation_checkpointing"]), ("ddp", [])):
        run2(base + extra, tmp_path / name)
    fsdp, fsdp_ac, ddp = (records(tmp_path / n) for n in ("fsdp", "fsdp_ac", "ddp"))
    assert len(fsdp) == 6 and len({v[0] for v in fsdp.values()}) == 6
    assert fsdp_ac == fsdp
    assert_close({k: v[:1] for k, v in fsdp.items()}, {k: v[:1] for k, v in ddp.items()})   # losses
    assert_close({k: v[1:] for k, v in fsdp.items()}, {k: v[1:] for k, v in ddp.items()}, rtol=1e-4)  # grad norms
    assert_same_model(tmp_path / "fsdp", tmp_path / "ddp")
    assert json.loads((tmp_path / "fsdp" / "config.json").read_text())["model_type"] == "rwkv7qwen2"
    student = qrwkv.load_model(str(tmp_path / "fsdp"))
    assert isinstance(student.model.layers[0].self_attn, qrwkv.TimeMix7)
    assert isinstance(student.model.layers[2].self_attn, qrwkv.Attention)
