"""
Convert a softmax-attention teacher (Qwen2/2.5, Qwen3, LLaMA, Mistral, SmolLM2) into a QRWKV model by
distillation (SPEC §5, the RADLADS recipe):

  step 1  attention alignment: every time-mix block learns to reproduce its layer's teacher attention
          output from the same normalised input; the residual stream advances with the teacher's output.
          loss = mean over tokens and layers of ||y_teacher - y_student||_2 / sqrt(C); only time-mix trains.
  step 2  distillation: forward KL(teacher || student) over the full vocabulary (temperature 1), computed
          in token chunks (see `kl_divergence`); every student parameter trains, a tied LM head is untied.
  step 3  (optional, --steps3 > 0) cross-entropy on long sequences, no teacher.

The demo (SmolLM2-135M-Instruct + Wikipedia summaries, fetched by prepare.py): the defaults are 30 + 30 steps of
1 sequence x 512 tokens x 2 micro-batches per process, 2048 tokens/step with 2 processes, ~61k + 61k tokens, ~30-40
minutes and ~8 GB of memory per process on 2 CPU cores (fp32: bf16 autocast was 8-40x slower on that CPU, so
--dtype auto is fp32 on CPU). The main command is the 2-process one below; one process works too:

    python convert.py
    python convert.py --threads 1      # when other jobs share the cores: 2 threads under contention ran 3-4x slower
    python convert.py --teacher data/smollm2-135m-instruct --data data/wiki/summaries_en-us.json --out out/smol

2 processes on one CPU machine (gloo; each rank gets cores // 2 threads):

    torchrun --standalone --nproc_per_node=2 convert.py --teacher DIR --data PATH --out OUT

One machine with 8 GPUs (nccl, bf16 autocast):

    torchrun --standalone --nproc_per_node=8 convert.py --teacher Qwen2.5-7B-Instruct --data text/ --out out/q7 \\
        --seq_len 512 --batch_size 4 --grad_accum 1 --steps1 6000 --steps2 15000 --lr2 1e-5 --eval_interval 1000

Several machines (run on each node, node_rank 0..nnodes-1; the rendezvous endpoint is node 0):

    torchrun --nnodes=4 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_HOST:29500 --rdzv_id=qrwkv convert.py --teacher DIR --data PATH --out OUT

Continue an interrupted run exactly (same losses as an uninterrupted one): add --resume. Only one stage:
--stage 1|2|3 (--stage 2 --resume after a finished step 1 continues from its student). A longer run:
--resume with a larger --steps2 (or --steps1/--steps3) continues a finished stage.

Output directory (--out): the final model is written into it as a Hugging Face style directory, so
`python generate.py --model OUT` and `qrwkv.load_model(OUT)` work:

    OUT/config.json, model.safetensors, tokenizer*.json, ...   the converted model (after the last stage)
    OUT/ckpt.pt        latest checkpoint: student, optimizer, stage/step, RNG states, args, hashes
    OUT/run.json       identity of the run (teacher/tokenizer/data hashes, arguments)
    OUT/metrics.jsonl  one JSON line per logged step and per evaluation
    OUT/data/          tokenised data: train.bin / val.bin (uint32, EOS between documents) + meta.json

Data (--data): a .txt file (one document), a folder of .txt/.jsonl/.json files, a .jsonl file with a
"text" field per line, a .json mapping {title: {"extract": text, ...}} (Wikipedia summaries) or a JSON
list of strings / objects with "text". Tokenised once with the teacher's tokenizer; the last
--val_fraction of documents is held out for evaluation.

Teachers too big for one device: the path is FSDP2 (`torch.distributed.fsdp.fully_shard`): shard the frozen
teacher per layer (`fully_shard(layer)` for each teacher block, then the root) and the student likewise
instead of wrapping it in DDP; everything else here (data, losses, chunked KL, checkpoints written from
the full state dict via `torch.distributed.checkpoint.state_dict.get_state_dict`) stays the same. This
reference implementation uses DDP only, i.e. teacher and student must fit on each device.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import qrwkv

DEMO_OUT = os.path.join("out", "smollm2-135m-qrwkv")
DATA_EXTS = (".txt", ".jsonl", ".json")
# arguments that change what is trained (the run identity); the others (logging, eval, stopping) may change freely
TRAINING_ARGS = ("stage", "attention_layers", "seq_len", "batch_size", "grad_accum", "steps1", "steps2", "steps3",
                 "lr1", "min_lr1", "warmup1", "lr2", "min_lr2", "warmup2", "lr3", "min_lr3", "warmup3",
                 "seq_len3", "batch_size3", "beta1", "beta2", "weight_decay", "grad_clip", "dtype", "seed",
                 "kl_chunk", "val_fraction")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Convert a softmax-attention teacher into a QRWKV (RWKV-6) model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--teacher", default=None, help="teacher Hugging Face directory (default: the demo SmolLM2-135M via prepare.py)")
    a("--data", default=None, help="text: .txt / .jsonl / .json file or a folder of them (default: demo wiki text)")
    a("--out", default=None, help=f"output directory (default: {DEMO_OUT} for the demo, else <teacher>-qrwkv)")
    a("--stage", default="all", choices=["1", "2", "3", "all"], help="which step(s) to run; all = 1, 2 (and 3 if --steps3 > 0)")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--attention_layers", default="", help="comma-separated layer indices kept as softmax attention (hybrid)")
    a("--seq_len", type=int, default=512, help="tokens per sequence in steps 1 and 2 (and evaluation)")
    a("--batch_size", type=int, default=1, help="sequences per micro-batch per process")
    a("--grad_accum", type=int, default=2, help="micro-batches per optimizer step")
    a("--steps1", type=int, default=30, help="optimizer steps of step 1 (attention alignment)")
    a("--steps2", type=int, default=30, help="optimizer steps of step 2 (distillation)")
    a("--steps3", type=int, default=0, help="optimizer steps of step 3 (long-context cross-entropy); 0 = skip")
    a("--lr1", type=float, default=1e-3, help="step 1 peak learning rate")
    a("--min_lr1", type=float, default=1e-5, help="step 1 final learning rate (cosine)")
    a("--warmup1", type=int, default=10, help="step 1 linear warm-up steps")
    a("--lr2", type=float, default=1e-4, help="step 2 peak learning rate (SPEC: 1e-5 at 250M+ tokens)")
    a("--min_lr2", type=float, default=1e-4, help="step 2 final learning rate (cosine; = lr2 is flat)")
    a("--warmup2", type=int, default=5, help="step 2 linear warm-up steps")
    a("--lr3", type=float, default=1e-5, help="step 3 peak learning rate")
    a("--min_lr3", type=float, default=1e-5, help="step 3 final learning rate (cosine; = lr3 is flat)")
    a("--warmup3", type=int, default=5, help="step 3 linear warm-up steps")
    a("--seq_len3", type=int, default=2048, help="tokens per sequence in step 3")
    a("--batch_size3", type=int, default=1, help="sequences per micro-batch per process in step 3")
    a("--beta1", type=float, default=0.9, help="AdamW beta1")
    a("--beta2", type=float, default=0.95, help="AdamW beta2")
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    a("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this (0 = off)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
      help="compute dtype (autocast; master weights stay fp32); auto = bfloat16 on CUDA, float32 on CPU")
    a("--kl_chunk", type=int, default=256, help="tokens per chunk when turning hidden states into logits (KL, eval)")
    a("--val_fraction", type=float, default=0.02, help="fraction of documents held out for evaluation (at least 1)")
    a("--eval_interval", type=int, default=0, help="evaluate every this many steps (0 = only at the end of each stage)")
    a("--eval_tokens", type=int, default=2048, help="held-out tokens per evaluation")
    a("--log_interval", type=int, default=5, help="print a progress line every this many steps")
    a("--save_interval", type=int, default=50, help="write the checkpoint every this many steps (and at stage end)")
    a("--stop_after", type=int, default=0, help="checkpoint and exit after this many steps in this invocation (0 = run to the end)")
    a("--seed", type=int, default=1337, help="random seed (initialisation and data sampling)")
    a("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")
    a("--threads", type=int, default=0, help="CPU threads per process (0 = available cores // processes on this node)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- errors and distributed helpers

class ConvertError(Exception):
    """A user-facing problem: reported as one line, exit status 1."""


class Dist:
    def __init__(self):
        self.enabled = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        self.master = self.rank == 0

    def all_mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world
        return x

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            x = x.clone()
            dist.all_reduce(x)
        return x

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def on_master(self, fn):
        """Run fn on rank 0 only; a ConvertError there is raised on every rank (others must not wait forever)."""
        err = None
        if self.master:
            try:
                fn()
            except ConvertError as e:
                err = str(e)
        if self.enabled:
            box = [err]
            dist.broadcast_object_list(box, src=0)
            err = box[0]
        if err is not None:
            raise ConvertError(err)


def log(d: Dist, msg: str):
    if d.master:
        print(msg, flush=True)


def file_sha(path, limit=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read() if limit is None else f.read(limit))
    return h.hexdigest()[:16]


def teacher_hash(path: str) -> str:
    """config.json + each weight file's size, first and last MiB: cheap, and differs for other weights."""
    h = hashlib.sha256(open(os.path.join(path, "config.json"), "rb").read())
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            f = os.path.join(path, name)
            size = os.path.getsize(f)
            with open(f, "rb") as fh:
                h.update(f"{name}:{size}".encode() + fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- data

def data_files(path: str) -> list:
    if os.path.isdir(path):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.endswith(DATA_EXTS))
        if not files:
            raise ConvertError(f"data {path}: folder holds no {'/'.join(DATA_EXTS)} files")
        return files
    if not os.path.isfile(path):
        raise ConvertError(f"data {path}: no such file or folder")
    if not path.endswith(DATA_EXTS):
        raise ConvertError(f"data {path}: unsupported format; use {', '.join(DATA_EXTS)} or a folder of them")
    return [path]


def _doc_text(obj, where):
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        for key in ("text", "extract"):
            if isinstance(obj.get(key), str):
                return obj[key]
    raise ConvertError(f"data {where}: expected a string or an object with a 'text' (or 'extract') field, got {type(obj).__name__}")


def read_documents(files: list) -> list:
    docs = []
    for f in files:
        try:
            if f.endswith(".txt"):
                docs.append(open(f, encoding="utf-8").read())
            elif f.endswith(".jsonl"):
                for n, line in enumerate(open(f, encoding="utf-8"), 1):
                    if line.strip():
                        docs.append(_doc_text(json.loads(line), f"{f}:{n}"))
            else:
                obj = json.load(open(f, encoding="utf-8"))
                items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else None
                if items is None:
                    raise ConvertError(f"data {f}: expected a JSON object {{title: {{extract: text}}}} or a list")
                docs.extend(_doc_text(x, f) for x in items)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"data {f}: cannot read it ({type(e).__name__}: {e})".splitlines()[0])
    return [d for d in docs if d.strip()]


def eos_id(teacher_dir: str) -> int:
    for name in ("generation_config.json", "config.json"):
        f = os.path.join(teacher_dir, name)
        if os.path.isfile(f):
            e = json.load(open(f)).get("eos_token_id")
            if isinstance(e, list) and e:
                e = e[0]
            if isinstance(e, int):
                return e
    raise ConvertError(f"teacher {teacher_dir}: no eos_token_id in generation_config.json or config.json")


def data_key(data_path: str, teacher_dir: str, val_fraction: float) -> dict:
    """What the tokenised data depends on: the source files (path, size, mtime), tokenizer, EOS, split."""
    files = data_files(data_path)
    sources = [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]
    return dict(sources=sources, tokenizer=file_sha(os.path.join(teacher_dir, "tokenizer.json")),
                val_fraction=val_fraction, eos=eos_id(teacher_dir), format=1)


def prepare_data(d: Dist, data_path: str, teacher_dir: str, out: str, key: dict) -> dict:
    """Tokenise once into OUT/data/{train,val}.bin (uint32) + meta.json; reuse them when nothing changed."""
    files = [s[0] for s in key["sources"]]
    val_fraction, tok_hash = key["val_fraction"], key["tokenizer"]
    ddir = os.path.join(out, "data")
    meta_path = os.path.join(ddir, "meta.json")

    def build():
        if os.path.isfile(meta_path):
            meta = json.load(open(meta_path))
            if meta.get("key") == key:
                return
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(teacher_dir, "tokenizer.json"))
        docs = read_documents(files)
        if not docs:
            raise ConvertError(f"data {data_path}: no text found")
        ids = []
        for i in range(0, len(docs), 512):
            for enc in tok.encode_batch(docs[i:i + 512], add_special_tokens=False):
                ids.append(np.asarray(enc.ids + [key["eos"]], dtype=np.uint32))
        if len(ids) >= 2:       # hold out whole documents
            n_val = max(1, round(val_fraction * len(ids)))
            n_val = min(n_val, len(ids) - 1)
            train, val, split = np.concatenate(ids[:-n_val]), np.concatenate(ids[-n_val:]), "documents"
        else:                   # one document: hold out its tail
            allt = ids[0]
            n_val = max(2, int(len(allt) * val_fraction))
            train, val, split = allt[:-n_val], allt[-n_val:], "tokens (single document)"
        os.makedirs(ddir, exist_ok=True)
        for name, arr in (("train", train), ("val", val)):
            arr.tofile(os.path.join(ddir, f"{name}.bin.tmp"))
            os.replace(os.path.join(ddir, f"{name}.bin.tmp"), os.path.join(ddir, f"{name}.bin"))
        meta = dict(key=key, tokenizer_sha=tok_hash, docs=len(ids), val_docs=n_val if split == "documents" else 0,
                    split=split, train_tokens=int(len(train)), val_tokens=int(len(val)))
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(meta_path + ".tmp", meta_path)
        log(d, f"data: {meta['docs']} documents -> {meta['train_tokens']:,} train / {meta['val_tokens']:,} held-out tokens in {ddir}")

    d.on_master(build)
    meta = json.load(open(meta_path))
    meta["train"] = np.memmap(os.path.join(ddir, "train.bin"), dtype=np.uint32, mode="r")
    meta["val"] = np.memmap(os.path.join(ddir, "val.bin"), dtype=np.uint32, mode="r")
    return meta


def get_batch(data, seed, stage, step, micro, d: Dist, batch_size, seq_len, grad_accum, device):
    """(B, T+1) token windows for one micro-batch. The global batch of an optimizer step is drawn from
    (seed, stage, step) alone; sample j = (micro·world + rank)·B + b, so 2 ranks × B equals 1 rank × 2B."""
    rng = np.random.default_rng((seed, stage, step))
    starts = rng.integers(0, len(data) - seq_len, size=grad_accum * d.world * batch_size)
    j = (micro * d.world + d.rank) * batch_size
    x = np.stack([data[s:s + seq_len + 1] for s in starts[j:j + batch_size]]).astype(np.int64)
    return torch.from_numpy(x).to(device, non_blocking=True)


# ----------------------------------------------------------------------------- losses

@torch.no_grad()
def teacher_attention_io(teacher: qrwkv.QRWKV, ids, layers):
    """Step-1 targets, the teacher advancing the residual stream: for each layer i in `layers`, its normalised
    attention input x_i and attention output y_i. Returns ([(i, x_i)], [y_i], cos, sin)."""
    h = teacher.model.embed_tokens(ids)
    cos, sin = teacher.rope(0, ids.shape[1], h.device, h.dtype)
    xs, ys = [], []
    for i, blk in enumerate(teacher.model.layers):
        x = blk.input_layernorm(h)
        y, _ = blk.self_attn(x, cos, sin, None)
        if i in layers:
            xs.append((i, x))
            ys.append(y)
        h = h + y
        h = h + blk.mlp(blk.post_attention_layernorm(h))
    return xs, ys, cos, sin


def alignment_loss(y_teacher, y_student) -> torch.Tensor:
    """Step 1: mean over layers and tokens of ‖y_teacher − y_student‖₂ / √C, in fp32."""
    C = y_teacher[0].shape[-1]
    return torch.stack([(yt.float() - ys.float()).norm(dim=-1).mean() for yt, ys in zip(y_teacher, y_student)]).mean() / math.sqrt(C)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of KL(teacher || student) = Σ_v p_t (log p_t − log p_s), temperature 1, in fp32."""
    log_ps = F.log_softmax(student_logits.float(), dim=-1)
    log_pt = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="sum")


def chunked_kl(h_student, h_teacher, head_student, head_teacher_weight, chunk):
    """Mean per-token KL from final hidden states, `chunk` tokens at a time; each chunk is checkpointed, so
    only one chunk's (chunk × vocab) logits exist at once, in forward and in backward."""
    hs, ht = h_student.flatten(0, -2), h_teacher.flatten(0, -2)

    def piece(hs_c, ht_c):
        with torch.no_grad():
            lt = F.linear(ht_c, head_teacher_weight)
        return kl_divergence(head_student(hs_c), lt)

    total = 0.0
    for i in range(0, hs.shape[0], chunk):
        total = total + checkpoint(piece, hs[i:i + chunk], ht[i:i + chunk], use_reentrant=False)
    return total / hs.shape[0]


def chunked_ce(h, head, targets, chunk):
    """Mean next-token cross-entropy from final hidden states, chunk by chunk (checkpointed like chunked_kl)."""
    h, targets = h.flatten(0, -2), targets.flatten()
    fn = lambda hc, tc: F.cross_entropy(head(hc).float(), tc, reduction="sum")
    total = 0.0
    for i in range(0, h.shape[0], chunk):
        total = total + checkpoint(fn, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
    return total / h.shape[0]


# ----------------------------------------------------------------------------- the trained modules

class Aligner(nn.Module):
    """Step 1: the student's time-mix blocks. forward(xs) maps each layer's normalised teacher input to the
    time-mix output, so DDP (which needs the trained parameters used inside its forward) wraps exactly this."""
    def __init__(self, timemixes: dict):
        super().__init__()
        self.blocks = nn.ModuleDict({str(i): tm for i, tm in timemixes.items()})

    def forward(self, xs, cos, sin):
        return [self.blocks[str(i)](x, cos, sin, None)[0] for i, x in xs]


class Distiller(nn.Module):
    """Step 2 (teacher hidden states given: KL) and step 3 (targets given: cross-entropy) around the student."""
    def __init__(self, student: qrwkv.QRWKV, chunk: int):
        super().__init__()
        self.student, self.chunk = student, chunk

    def forward(self, ids, teacher_hidden=None, teacher_head_weight=None, targets=None):
        h, _ = self.student(ids, return_hidden=True)
        if targets is not None:
            return chunked_ce(h, self.student.lm_head, targets, self.chunk)
        return chunked_kl(h, teacher_hidden, self.student.lm_head, teacher_head_weight, self.chunk)


def new_timemixes(teacher: qrwkv.QRWKV, attention_layers, device) -> dict:
    """Time-mix blocks initialised per SPEC §3 (q/k/v/o copied from the teacher), without building a second model."""
    cfg = replace(teacher.config, attention_layers=tuple(attention_layers))
    out = {}
    for i, block in enumerate(teacher.model.layers):
        if i in cfg.attention_layers:
            continue
        with torch.device(device):
            tm = qrwkv.TimeMix(cfg, i)
        missing, unexpected = tm.load_state_dict(block.self_attn.state_dict(), strict=False)
        assert not unexpected, unexpected
        out[i] = tm.float()
    return out


def build_student(teacher, attention_layers, timemixes=None, state=None):
    """Full student in fp32: the teacher's blocks with time-mix, untied head; time-mix weights from step 1
    or a whole state dict from a checkpoint."""
    student = qrwkv.student_from_teacher(teacher, attention_layers=tuple(attention_layers)).float()
    student.untie_lm_head()
    if timemixes is not None:
        for i, tm in timemixes.items():
            student.model.layers[i].self_attn = tm
    if state is not None:
        student.load_state_dict(state)
    for p in student.parameters():
        p.requires_grad_(True)
    return student


@contextlib.contextmanager
def swapped_in(teacher, timemixes):
    """The teacher with its attention blocks replaced by the time-mix blocks = the step-1 student."""
    saved = {i: teacher.model.layers[i].self_attn for i in timemixes}
    try:
        for i, tm in timemixes.items():
            teacher.model.layers[i].self_attn = tm
        yield teacher
    finally:
        for i, m in saved.items():
            teacher.model.layers[i].self_attn = m


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(d, args, teacher, student_ctx, val, device, amp):
    """Teacher and student perplexity, KL(teacher || student) and top-1 agreement on fixed held-out windows.
    student_ctx() is a context manager giving the student (in step 1: the teacher with time-mix blocks swapped in)."""
    T = min(args.seq_len, len(val) - 1)
    n_seq = max(1, args.eval_tokens // T)
    starts = np.linspace(0, len(val) - T - 1, n_seq).astype(np.int64)
    mine = starts[d.rank::d.world]
    sums = torch.zeros(5, dtype=torch.float64)   # ce_t, ce_s, kl, agree, n
    for b in range(0, len(mine), args.batch_size):
        x = torch.from_numpy(np.stack([val[s:s + T + 1] for s in mine[b:b + args.batch_size]]).astype(np.int64)).to(device)
        ids, tgt = x[:, :-1], x[:, 1:].flatten()
        with amp():
            ht, _ = teacher(ids, return_hidden=True)
        with student_ctx() as student, amp():
            was_training = student.training
            hs, _ = student.eval()(ids, return_hidden=True)
            student.train(was_training)
        ht, hs = ht.flatten(0, 1), hs.flatten(0, 1)
        for i in range(0, ht.shape[0], args.kl_chunk):
            with amp():
                lt, ls = teacher.lm_head(ht[i:i + args.kl_chunk]).float(), student.lm_head(hs[i:i + args.kl_chunk]).float()
            tc = tgt[i:i + args.kl_chunk]
            sums += torch.tensor([F.cross_entropy(lt, tc, reduction="sum").item(), F.cross_entropy(ls, tc, reduction="sum").item(),
                                  kl_divergence(ls, lt).item(), (lt.argmax(-1) == ls.argmax(-1)).sum().item(), len(tc)],
                                 dtype=torch.float64)
    sums = d.all_sum(sums.to(device)).cpu()
    n = sums[4].item()
    return dict(teacher_ppl=math.exp(sums[0] / n), student_ppl=math.exp(min(sums[1] / n, 700)),
                kl=sums[2].item() / n, top1_agree=sums[3].item() / n, tokens=int(n))


def eval_table(stage, step, r) -> str:
    return (f"eval | stage {stage} step {step} | {r['tokens']} held-out tokens\n"
            f"       perplexity  teacher {r['teacher_ppl']:9.3f}   student {r['student_ppl']:9.3f}\n"
            f"       KL(teacher||student) {r['kl']:.4f}   top-1 agreement {100 * r['top1_agree']:.1f}%")


# ----------------------------------------------------------------------------- run directory and checkpoint

def run_identity(args, d, teacher_dir, key):
    return dict(teacher=teacher_hash(teacher_dir), tokenizer=key["tokenizer"],
                data=hashlib.sha256(json.dumps(key["sources"]).encode()).hexdigest()[:16],
                args={k: getattr(args, k) for k in TRAINING_ARGS} | {"world_size": d.world})


def check_out_dir(args, identity):
    """Refuse to overwrite a different run; refuse to restart a checkpointed run without --resume;
    refuse a resume with another teacher or tokenizer. Returns the checkpoint to resume from (or None)."""
    ckpt_path, run_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "run.json")
    prev = json.load(open(run_path)) if os.path.isfile(run_path) else None
    if prev is None:
        others = [f for f in os.listdir(args.out) if f not in ("data", "metrics.jsonl")] if os.path.isdir(args.out) else []
        if others:
            raise ConvertError(f"--out {args.out} exists and is not a convert.py run directory (holds {others[0]}); choose another --out")
        return None
    if not os.path.isfile(ckpt_path):      # nothing trained yet (a run stopped before its first checkpoint): start over
        return None
    diff = [k for k in ("teacher", "tokenizer", "data") if prev.get(k) != identity[k]]
    diff += [f"--{k}" for k in identity["args"] if prev.get("args", {}).get(k) != identity["args"][k]]
    if not args.resume:
        if diff:
            raise ConvertError(f"--out {args.out} holds a different run (differs in {', '.join(diff)}); "
                               f"pass --resume to continue it or choose another --out")
        raise ConvertError(f"--out {args.out} already holds this run with a checkpoint; pass --resume to continue it "
                           f"or delete the directory to start over")
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if ck["identity"]["teacher"] != identity["teacher"]:
        raise ConvertError(f"--resume: teacher {args.teacher} differs from the one the checkpoint was trained with "
                           f"({ck['args'].get('teacher')})")
    if ck["identity"]["tokenizer"] != identity["tokenizer"]:
        raise ConvertError(f"--resume: teacher tokenizer differs from the checkpoint's (tokenizer.json hash "
                           f"{identity['tokenizer']} vs {ck['identity']['tokenizer']})")
    return ck


def save_checkpoint(d, args, path, payload):
    if d.master:
        tmp = path + ".tmp"
        torch.save(payload, tmp)
        os.replace(tmp, path)
    d.barrier()


def rng_states():
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_states(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_final(d, student, out, teacher_dir, dtype):
    """qrwkv.save_model into OUT/.final, then move its files into OUT (config.json last)."""
    if d.master:
        tmp = os.path.join(out, ".final")
        qrwkv.save_model(student.to(dtype), tmp, tokenizer_dir=teacher_dir)
        student.float()
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
        for name in os.listdir(out):   # weight files of an earlier save that this one does not replace
            if name.endswith(".safetensors") or name == "model.safetensors.index.json":
                if name not in names:
                    os.remove(os.path.join(out, name))
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        os.rmdir(tmp)
    d.barrier()


def lr_at(step, total, lr, min_lr, warmup):
    """Linear warm-up to lr, then cosine from lr to min_lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------- main

def run(args, d: Dist):
    # --- defaults, device, threads
    if args.teacher is None or args.data is None:
        import prepare                      # the demo: SmolLM2-135M-Instruct + Wikipedia summaries
        holder = {}

        def fetch():
            try:
                holder["p"] = prepare.prepare()
            except Exception as e:   # PrepareError, network, ...
                raise ConvertError(f"prepare.py could not provide the demo teacher/text: {e}".splitlines()[0])
        d.on_master(fetch)
        t_dir, text = prepare.prepare(quiet=True) if not d.master else holder["p"]
        args.teacher = args.teacher or str(t_dir)
        args.data = args.data or str(text)
        args.out = args.out or DEMO_OUT
    args.out = args.out or args.teacher.rstrip("/") + "-qrwkv"
    if os.path.abspath(args.out) == os.path.abspath(args.teacher):
        raise ConvertError("--out must differ from --teacher")
    if args.device == "auto":
        device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(f"cuda:{d.local_rank}" if args.device == "cuda" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(args.threads or max(1, cores // d.local_world))
    # CPU: bf16 autocast ran 8x (teacher forward) to 40x (time-mix backward) slower than fp32 on the project's
    # 2-core machines (no native bf16 units), so auto means fp32 there
    use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    for name in ("seq_len", "batch_size", "grad_accum", "kl_chunk", "seq_len3", "batch_size3", "log_interval", "save_interval"):
        if getattr(args, name) < 1:
            raise ConvertError(f"--{name} must be at least 1")

    # --- teacher (frozen, outside DDP, on every rank)
    try:
        t_cfg = qrwkv.load_config(args.teacher)
        if t_cfg.is_converted:
            raise ValueError(f"model_type {t_cfg.model_type} is already a converted QRWKV model; pass the softmax-attention teacher")
        if not os.path.isfile(os.path.join(args.teacher, "tokenizer.json")):
            raise FileNotFoundError("no tokenizer.json")
        # fp32 on CPU (autocast computes in bf16; the student starts from exact weights), bf16 on GPUs to save memory
        teacher = qrwkv.load_model(args.teacher, dtype=torch.bfloat16 if use_bf16 and device.type == "cuda" else torch.float32,
                                   device=device)
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        raise ConvertError(f"teacher {args.teacher}: {e}".splitlines()[0])
    teacher.requires_grad_(False)
    L, C = t_cfg.num_hidden_layers, t_cfg.hidden_size
    try:
        attention_layers = tuple(sorted({int(x) for x in args.attention_layers.split(",") if x.strip()}))
    except ValueError:
        raise ConvertError(f"--attention_layers {args.attention_layers!r}: expected comma-separated layer indices")
    if any(not 0 <= i < L for i in attention_layers):
        raise ConvertError(f"--attention_layers {args.attention_layers}: the teacher has layers 0..{L - 1}")
    if len(attention_layers) == L:
        raise ConvertError("--attention_layers keeps every layer as attention: nothing to convert")

    # --- the run directory, then the data
    key = data_key(args.data, args.teacher, args.val_fraction)
    identity = run_identity(args, d, args.teacher, key)
    ck = check_out_dir(args, identity)
    d.barrier()
    if d.master:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "run.json.tmp"), "w") as f:
            json.dump(identity | {"teacher_dir": os.path.abspath(args.teacher), "data_path": os.path.abspath(args.data),
                                  "teacher_config": t_cfg.raw}, f, indent=1)
        os.replace(os.path.join(args.out, "run.json.tmp"), os.path.join(args.out, "run.json"))
    meta = prepare_data(d, args.data, args.teacher, args.out, key)
    train, val = meta["train"], meta["val"]
    need = args.batch_size * (args.seq_len + 1)
    if len(train) < need:
        raise ConvertError(f"data {args.data}: {len(train)} training tokens, fewer than one batch "
                           f"(batch_size {args.batch_size} x (seq_len {args.seq_len} + 1) = {need}); add text or lower --seq_len")
    if len(val) < 2:
        raise ConvertError(f"data {args.data}: held-out split has {len(val)} tokens; raise --val_fraction or add documents")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    ckpt_path = os.path.join(args.out, "ckpt.pt")

    def record(rec):
        if d.master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    stages = [1, 2] + ([3] if args.steps3 > 0 else []) if args.stage == "all" else [int(args.stage)]
    totals = {1: args.steps1, 2: args.steps2, 3: args.steps3}
    stage, step, done = stages[0], 0, False
    model_kind, model_state, opt_state, resumed_stage = None, None, None, None
    if ck is not None:
        stage, step, done = ck["stage"], ck["step"], ck["stage_done"]
        if done and step < totals[stage]:  # a longer run: --resume with more --steps continues the finished stage
            done = False
        model_kind, model_state, opt_state = ck["model_kind"], ck["model"], ck["optimizer"]
        changed = [k for k in TRAINING_ARGS if ck["args"].get(k) != getattr(args, k)]
        log(d, f"resuming stage {stage} step {step}{' (done)' if done else ''} from {ckpt_path}"
               + (f"; changed arguments: {', '.join(changed)}" if changed else ""))
        set_rng_states(ck["rng"])
        resumed_stage = stage
        if stage not in stages and not done:
            stages = [stage] + [s for s in stages if s > stage]
        stages = [s for s in stages if s > stage or (s == stage and not done)]
    else:
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
    log(d, f"teacher {args.teacher}: {t_cfg.model_type}, {L} layers, C {C}, vocab {t_cfg.vocab_size}; "
           f"{len(train):,} train tokens; {d.world} process(es) on {device}, "
           f"{torch.get_num_threads() if device.type == 'cpu' else 1} threads each, {'bf16' if use_bf16 else 'fp32'}; "
           f"stages {stages or 'none (run complete)'}")

    # what the last finished piece of work left: time-mix blocks (step 1) or a whole student (steps 2, 3)
    timemixes, student = None, None
    if model_kind == "timemix":
        timemixes = new_timemixes(teacher, attention_layers, device)
        for i, tm in timemixes.items():
            tm.load_state_dict({k.split(".", 1)[1]: v for k, v in model_state.items() if k.split(".", 1)[0] == str(i)})
    elif model_kind == "student":
        student = build_student(teacher, attention_layers, state=model_state)
    stopped_early = False
    last_ckpt = [ck["stage"], ck["step"]] if ck is not None else []
    ck = model_state = None   # free the loaded copy (the live model holds the weights now)
    steps_this_run = 0

    for stage in stages:
        total = totals[stage]
        resuming_here = resumed_stage == stage and not done
        start = step if resuming_here else 0
        # --- the trained module, its optimizer and the per-step loss
        if stage == 1:
            if student is not None:
                raise ConvertError("step 1 cannot follow a step-2/3 checkpoint; use another --out")
            if timemixes is None:
                timemixes = new_timemixes(teacher, attention_layers, device)
            module = Aligner(timemixes)
            lr, min_lr, warmup = args.lr1, args.min_lr1, args.warmup1
            B, T = args.batch_size, args.seq_len
        else:
            if student is None:
                student = build_student(teacher, attention_layers, timemixes=timemixes)
                timemixes = None
            module = Distiller(student, args.kl_chunk)
            lr, min_lr, warmup = (args.lr2, args.min_lr2, args.warmup2) if stage == 2 else (args.lr3, args.min_lr3, args.warmup3)
            B, T = (args.batch_size, args.seq_len) if stage == 2 else (args.batch_size3, min(args.seq_len3, len(train) - 1))
            if stage == 3 and len(train) < B * (T + 1):
                raise ConvertError(f"data {args.data}: too few tokens for step 3 batches")
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(args.beta1, args.beta2), eps=1e-8,
                                      weight_decay=args.weight_decay, fused=device.type == "cuda")
        if resuming_here and opt_state is not None:
            optimizer.load_state_dict(opt_state)
        opt_state = None
        model = DDP(module, device_ids=[device.index] if device.type == "cuda" else None) if d.enabled else module
        module.train()

        def micro_loss(x):
            ids = x[:, :-1]
            if stage == 1:
                with amp():
                    xs, ys, cos, sin = teacher_attention_io(teacher, ids, timemixes)
                    outs = model(xs, cos, sin)
                return alignment_loss(ys, outs)
            if stage == 2:
                with torch.no_grad(), amp():
                    ht, _ = teacher(ids, return_hidden=True)
                with amp():
                    return model(ids, teacher_hidden=ht, teacher_head_weight=teacher.lm_head.weight)
            with amp():
                return model(ids, targets=x[:, 1:])

        def checkpoint_now(step_done, stage_done):
            last_ckpt[:] = [stage, step_done]
            state = {f"{i}.{k}": v for i, tm in timemixes.items() for k, v in tm.state_dict().items()} if stage == 1 else None
            save_checkpoint(d, args, ckpt_path, dict(
                stage=stage, step=step_done, stage_done=stage_done, model_kind="timemix" if stage == 1 else "student",
                model=state if stage == 1 else student.state_dict(), optimizer=optimizer.state_dict(),
                data_position=dict(seed=args.seed, stage=stage, next_step=step_done), rng=rng_states(),
                args=vars(args), identity=identity, teacher_config=t_cfg.raw))

        eval_student = lambda: swapped_in(teacher, timemixes) if stage == 1 else contextlib.nullcontext(student)

        def run_eval(at_step):
            r = evaluate(d, args, teacher, eval_student, val, device, amp)
            log(d, eval_table(stage, at_step, r))
            record(dict(kind="eval", stage=stage, step=at_step) | r)

        tokens_per_step = args.grad_accum * d.world * B * T
        log(d, f"stage {stage}: steps {start}..{total}, {tokens_per_step} tokens/step (B {B} x T {T} x accum {args.grad_accum} "
               f"x {d.world} proc), lr {lr:g}->{min_lr:g}, {sum(p.numel() for p in params):,} trainable parameters")
        if start == 0 and stage == stages[0] and resumed_stage is None and args.eval_tokens > 0:
            run_eval(0)
        dt_ema = None
        for s in range(start, total):
            t0 = time.time()
            lr_now = lr_at(s, total, lr, min_lr, warmup)
            for g in optimizer.param_groups:
                g["lr"] = lr_now
            loss_sum = torch.zeros((), device=device)
            for m in range(args.grad_accum):
                x = get_batch(train, args.seed, stage, s, m, d, B, T, args.grad_accum, device)
                sync = contextlib.nullcontext() if (m == args.grad_accum - 1 or not d.enabled) else model.no_sync()
                with sync:
                    loss = micro_loss(x) / args.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
            loss_all = d.all_mean(loss_sum).item()
            gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
            if not math.isfinite(loss_all) or not torch.isfinite(gnorm):
                last = f"kept {ckpt_path} (stage {last_ckpt[0]} step {last_ckpt[1]})" if last_ckpt else "no checkpoint written yet"
                raise ConvertError(f"stage {stage} step {s + 1}: loss is {loss_all} (grad norm {gnorm.item():.3g}); stopped, "
                                   f"{last}; lower the learning rate and --resume")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps_this_run += 1
            now = time.time()
            dt = now - t0
            dt_ema = dt if dt_ema is None else 0.9 * dt_ema + 0.1 * dt
            rec = dict(kind="train", stage=stage, step=s + 1, loss=loss_all, lr=lr_now, grad_norm=gnorm.item(),
                       tok_s=tokens_per_step / dt, time=now)
            record(rec)
            if (s + 1) % args.log_interval == 0 or s + 1 == total:
                log(d, f"stage {stage} | step {s + 1}/{total} | loss {loss_all:.5f} | lr {lr_now:.2e} | "
                       f"{tokens_per_step / dt_ema:.0f} tok/s | ETA {fmt_time(dt_ema * (total - s - 1))}")
            last_step = s + 1 == total
            if args.eval_interval and (s + 1) % args.eval_interval == 0 and not last_step:
                run_eval(s + 1)
            stop = args.stop_after and steps_this_run >= args.stop_after and not last_step
            if (s + 1) % args.save_interval == 0 and not last_step or stop:
                checkpoint_now(s + 1, False)
            if stop:
                stopped_early = True
                break
        if stopped_early:
            log(d, f"stopped after {steps_this_run} steps (--stop_after); continue with --resume")
            break
        if args.eval_tokens > 0:
            run_eval(total)
        checkpoint_now(total, True)
        if d.enabled:
            model = None   # drop the DDP wrapper (its hooks) before the next stage
        if stage == 1 and d.enabled:
            d.barrier()

    if not stopped_early:
        if student is None:
            student = build_student(teacher, attention_layers, timemixes=timemixes)
        save_final(d, student, args.out, args.teacher, qrwkv.DTYPES.get(t_cfg.dtype, torch.float32))
        log(d, f"saved the converted model to {args.out} (load with qrwkv.load_model or generate.py --model {args.out})")


def main(argv=None):
    args = get_args(argv)
    d = Dist()
    if d.enabled and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    ok = False
    try:
        run(args, d)
        ok = True
    except ConvertError as e:
        if d.master:
            raise SystemExit(f"convert.py: error: {e}")
        raise SystemExit(1)
    finally:
        if d.enabled and dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
