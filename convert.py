"""
Convert a softmax-attention teacher (Qwen2/2.5, Qwen3, LLaMA, Mistral, SmolLM2) into a QRWKV (RWKV-6) model by
distillation, the RADLADS recipe (SPEC §5): step 1 attention alignment, step 2 KL distillation, optional step 3
long-context cross-entropy. The demo (teacher and text fetched by prepare.py) runs with no arguments:

    python convert.py                                  # one process (threads = cores)
    torchrun --standalone --nproc_per_node=2 convert.py --teacher DIR --data PATH --out OUT
    torchrun --standalone --nproc_per_node=8 convert.py --teacher Qwen2.5-7B-Instruct --data text/ --out out/q7 \\
        --seq_len 512 --batch_size 4 --grad_accum 1 --steps1 6000 --steps2 15000 --lr2 1e-5 --eval_interval 1000
    torchrun --nnodes=4 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER_HOST:29500 --rdzv_id=qrwkv convert.py ...       # several machines

--resume continues an interrupted run exactly (same losses); with larger --steps1/2/3 it extends a finished stage;
--stage 1|2|3 runs one stage; --stop_after N checkpoints and exits after N steps. Checkpoints written by
convert.py before the one-student redesign (format 1) cannot be resumed.

--out holds: the converted model (config.json, model.safetensors, tokenizer files: `generate.py --model OUT`),
ckpt.pt (latest checkpoint: tensors and plain types only, loaded with weights_only=True), run.json (the run's
identity), metrics.jsonl (one JSON line per step and evaluation) and data/ (tokenised train/held-out splits).

--data: a .txt file, a folder of .txt/.jsonl/.json files, a .jsonl with a "text" field per line, a .json
{title: {"extract": text}} (Wikipedia summaries) or a JSON list of strings or {"text": ...} objects. The last
--val_fraction of documents is held out for evaluation and never trained on.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch.distributed._composable import checkpoint as checkpoint_module
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import prepare
import qrwkv

DEMO_OUT = os.path.join("out", "smollm2-135m-qrwkv")
CKPT_FORMAT = 2
# --calibrate's default per --student: RWKV-6's closed forms need 2 micro-batches; RWKV-7's per-channel output affine
# (calibrate_rwkv7) reached a step-0 held-out ppl ratio of 24x on 4 and 19x on 16 (SPEC init: 2,311x), with the
# default per-head decay search 9.3x on 16 (demo done at --lr2 5e-4: 1.42x, against 2.15x with the SPEC w0)
CALIBRATE = {"rwkv6": 2, "rwkv7": 16}
# --steps2's default per --student: the demo's ~25-minute budget on 2 cores (RWKV-7 trains at ~55% of RWKV-6's tokens/s)
STEPS2 = {"rwkv6": 180, "rwkv7": 100}
CALIBRATE_DECAYS = {"rwkv6": ("search", "distance"), "rwkv7": ("search", "spec")}   # --calibrate_decay's per --student
# flags that do not change what is trained (paths, logging, evaluation, stopping, device); every other flag is
# part of the run identity, so a new flag is covered without touching this list
FREE_ARGS = ("teacher", "data", "out", "resume", "eval_interval", "eval_tokens", "eval_text", "log_interval",
             "save_interval", "stop_after", "device", "threads")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Convert a softmax-attention teacher into a QRWKV (RWKV-6) model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run").add_argument
    g("--teacher", default=None, help="teacher Hugging Face directory (default: the demo SmolLM2-135M via prepare.py)")
    g("--data", default=None, help="text: .txt / .jsonl / .json file or a folder of them (default: demo wiki text)")
    g("--out", default=None, help=f"output directory (default: {DEMO_OUT} for the demo, else <teacher>-qrwkv)")
    g("--stage", default="all", choices=["1", "2", "3", "all"], help="which step(s) to run; all = 1, 2 (and 3 if --steps3 > 0)")
    g("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g("--attention_layers", default="", help="layers kept as softmax attention (hybrid): comma-separated indices, or auto:K "
                                             "= the K layers whose conversion alone costs the most KL after calibration")
    g("--student", default="rwkv6", choices=["rwkv6", "rwkv7"], help="student mixer: rwkv6 (rwkv6qwen2, SPEC §3) or rwkv7 (rwkv7qwen2, SPEC §9)")
    # 2 x 512 tokens calibrate as well as 4 (demo: step-0 held-out ppl 13.55x vs 13.53x the teacher's) in half the time
    # search: demo held-out ppl after step 1 2.96x vs 10.2x the teacher's with "distance", for ~1.5 more minutes
    g("--calibrate_decay", default="search", choices=["distance", "search", "spec"], help="calibrated decay per head: a "
      "grid search of the least-squares residual (rwkv6: 7 points, rwkv7: 6 w0 centres), or (faster, worse) rwkv6: "
      "from the teacher head's attention distance, rwkv7: spec = the SPEC §9 w0")
    g("--calibrate", type=int, default=None, help="teacher micro-batches for the calibrated time-mix init (calibrate.py); "
                                                  "default 2 (rwkv6), 16 (rwkv7); 0 = SPEC §3 init only")
    g("--seed", type=int, default=1337, help="random seed (initialisation and data sampling)")
    g("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
      help="compute dtype (bf16 = bf16 teacher + autocast student, fp32 master weights); auto = bf16 on GPUs and on CPUs with native bf16")
    g("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda")
    g("--threads", type=int, default=0, help="CPU threads per process (0 = available cores // processes on this node)")
    g("--fsdp", action="store_true", help="shard teacher and student over the processes (FSDP2, fully_shard per block) instead of "
                                          "a full copy per process (DDP); needed for 7B+ teachers; also with one process")
    g("--hsdp", type=int, default=0, help="with --fsdp: replicate over this many groups (e.g. nodes) and shard within each "
                                          "(HSDP, a 2-D mesh); 0 = shard over all processes")
    g("--activation_checkpointing", action="store_true", help="with --fsdp: recompute each student block in backward "
                                                              "instead of keeping its activations")
    g = p.add_argument_group("batches (steps 1 and 2)").add_argument
    g("--seq_len", type=int, default=512, help="tokens per sequence in steps 1 and 2 (and evaluation)")
    g("--batch_size", type=int, default=1, help="sequences per micro-batch per process")
    g("--grad_accum", type=int, default=2, help="micro-batches per optimizer step")
    g("--val_fraction", type=float, default=0.02, help="fraction of documents held out for evaluation (at least 1)")
    g = p.add_argument_group("step 1: attention alignment").add_argument
    g("--steps1", type=int, default=30, help="optimizer steps of step 1")
    g("--lr1", type=float, default=1e-3, help="step 1 peak learning rate")
    g("--min_lr1", type=float, default=1e-5, help="step 1 final learning rate (cosine)")
    g("--warmup1", type=int, default=5, help="step 1 linear warm-up steps")
    # demo: 16 x 512 tokens per process, ~4 epochs in 30 steps; later epochs ran 2-3x the tokens/s of the first
    g("--cache1", type=int, default=16, help="keep the teacher's step-1 targets of this many micro-batches per process in memory "
                                            "and cycle over them (epochs); 0 = a fresh teacher pass every micro-batch")
    g = p.add_argument_group("step 2: distillation").add_argument
    # STEPS2: 180 x 2,048 tokens is RWKV-6's step 2 on the demo in ~22 minutes on 2 cores with AMX-BF16 (~2x that in
    # fp32 elsewhere)
    g("--steps2", type=int, default=None, help="optimizer steps of step 2; default 180 (rwkv6), 100 (rwkv7)")
    # hundreds of steps, not ten thousand (SPEC §7): the mixer at step 1's rate, the teacher's MLPs, embeddings and head
    # frozen (in a first KD stage frozen MLPs gave 3.36 vs 66.7 ppl; RADLADS' 1e-5 for everything is for 250M+ tokens)
    # both students: RWKV-7 from its calibrated init reached 1.42x at 5e-4, 1.30x at 1e-3, 1.26x at 2e-3 and diverged at
    # 4e-3 (demo, 100 steps), so 1e-3 keeps a factor of 4 from the edge; from the SPEC init (--calibrate 0) it
    # diverged at 1e-3 (held-out ppl 11.6x -> 67x in 40 steps) and needs <= 2e-4
    g("--lr2", type=float, default=1e-3, help="step 2 peak learning rate of the time-mix blocks (SPEC: 1e-5 at 250M+ "
                                              "tokens; rwkv7 with --calibrate 0: 2e-4)")
    g("--min_lr2", type=float, default=None, help="step 2 final learning rate of the time-mix blocks (cosine; = lr2 is "
                                                  "flat); default lr2 / 10")
    g("--lr2_rest", type=float, default=0.0, help="step 2 peak learning rate of everything else (embeddings, norms, MLPs, "
                                                   "head), scaled like lr2 over the steps; 0 = frozen")
    g("--warmup2", type=int, default=3, help="step 2 linear warm-up steps")
    g("--kl_chunk", type=int, default=256, help="tokens per chunk when turning hidden states into logits (KL, CE, eval)")
    g = p.add_argument_group("step 3: long-context cross-entropy (optional)").add_argument
    g("--steps3", type=int, default=0, help="optimizer steps of step 3; 0 = skip")
    g("--lr3", type=float, default=1e-5, help="step 3 peak learning rate")
    g("--min_lr3", type=float, default=1e-5, help="step 3 final learning rate (cosine; = lr3 is flat)")
    g("--warmup3", type=int, default=5, help="step 3 linear warm-up steps")
    g("--seq_len3", type=int, default=2048, help="tokens per sequence in step 3")
    g("--batch_size3", type=int, default=1, help="sequences per micro-batch per process in step 3")
    g = p.add_argument_group("optimizer (all steps)").add_argument
    g("--beta1", type=float, default=0.9, help="AdamW beta1")
    g("--beta2", type=float, default=0.95, help="AdamW beta2")
    g("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this (0 = off)")
    g = p.add_argument_group("logging, evaluation, checkpoints").add_argument
    g("--eval_interval", type=int, default=0, help="evaluate every this many steps (0 = only at the end of each stage)")
    g("--eval_tokens", type=int, default=2048, help="held-out tokens per evaluation (0 = none)")
    g("--eval_text", default=None, help="a second held-out text (another domain) evaluated like the held-out split; never "
                                        "trained on (default for the demo: prepare.py's Shakespeare; '' = none)")
    g("--log_interval", type=int, default=5, help="print a progress line every this many steps")
    g("--save_interval", type=int, default=50, help="write the checkpoint every this many steps (and at stage end)")
    g("--stop_after", type=int, default=0, help="checkpoint and exit after this many steps in this invocation (0 = run to the end)")
    return student_defaults(p.parse_args(argv))


def student_defaults(args):
    """Fill the flags whose default depends on --student (CALIBRATE, STEPS2) and --min_lr2 = lr2 / 10."""
    args.steps2 = STEPS2[args.student] if args.steps2 is None else args.steps2
    args.calibrate = CALIBRATE[args.student] if args.calibrate is None else args.calibrate
    args.min_lr2 = args.lr2 / 10 if args.min_lr2 is None else args.min_lr2
    return args


class ConvertError(Exception):
    """A user-facing problem: main() prints it as one line `convert.py: error: ...` and exits with status 1."""


USER_ERRORS = (ConvertError, prepare.PrepareError)   # prepare.py's text reading raises the latter


def check_args(args, n_layers=None):
    """Every refusal that does not need the data, made before any work. Returns the kept attention layers
    (a tuple of indices, or an int K for auto:K)."""
    for name in ("seq_len", "batch_size", "grad_accum", "kl_chunk", "seq_len3", "batch_size3", "log_interval", "save_interval"):
        if getattr(args, name) < 1:
            raise ConvertError(f"--{name} must be at least 1")
    for name in ("calibrate", "cache1", "lr2_rest"):
        if getattr(args, name) < 0:
            raise ConvertError(f"--{name} must not be negative")
    if args.calibrate_decay not in CALIBRATE_DECAYS[args.student]:
        raise ConvertError(f"--calibrate_decay {args.calibrate_decay} is not a --student {args.student} option; "
                           f"pass {' or '.join(CALIBRATE_DECAYS[args.student])}")
    if os.path.abspath(args.out) == os.path.abspath(args.teacher):
        raise ConvertError("--out must differ from --teacher")
    spec = args.attention_layers.strip()
    if spec.startswith("auto:"):
        if not spec[5:].isdigit() or not 0 < int(spec[5:]) < n_layers:
            raise ConvertError(f"--attention_layers {spec}: auto:K needs 0 < K < {n_layers} (the teacher's layers)")
        if args.calibrate < 1:
            raise ConvertError("--attention_layers auto:K measures each layer's damage on the --calibrate batches; set --calibrate >= 1")
        if args.student == "rwkv7":
            raise ConvertError("--attention_layers auto:K: rwkv7qwen2 keeps attention only in its last layers; pass those indices")
        return int(spec[5:])
    try:
        layers = tuple(sorted({int(x) for x in spec.split(",") if x.strip()}))
    except ValueError:
        raise ConvertError(f"--attention_layers {args.attention_layers!r}: expected comma-separated layer indices or auto:K")
    if any(not 0 <= i < n_layers for i in layers):
        raise ConvertError(f"--attention_layers {args.attention_layers}: the teacher has layers 0..{n_layers - 1}")
    if len(layers) == n_layers:
        raise ConvertError("--attention_layers keeps every layer as attention: nothing to convert")
    return layers


# ----------------------------------------------------------------------------- processes and devices

class Dist:
    """torchrun's environment (or one process without it) and the few collectives the conversion uses."""
    def __init__(self):
        self.enabled = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank, self.local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        self.master = self.rank == 0
        self.own_group = False   # a world-size-1 process group made for --fsdp without torchrun

    def start(self, device: torch.device):
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def close(self, ok: bool):
        if self.enabled and dist.is_initialized():
            if ok:   # without it, 2-rank gloo runs aborted at exit 2 times in 3 (SPEC §5)
                dist.barrier()
            dist.destroy_process_group()
        elif self.own_group and dist.is_initialized():
            dist.destroy_process_group()

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            x = x.clone()
            dist.all_reduce(x)
        return x

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def on_master(self, fn):
        """Run fn on rank 0 only; a ConvertError there is raised on every rank (the others must not wait forever)."""
        err = None
        if self.master:
            try:
                fn()
            except USER_ERRORS as e:
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


def pick_device(args, d: Dist):
    """(device, compute dtype): cuda:LOCAL_RANK or cpu with cores // local processes threads; see qrwkv.auto_dtype."""
    want = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{d.local_rank}" if want == "cuda" else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = args.threads or max(1, cores // d.local_world)
        torch.set_num_threads(threads)
        if threads * d.local_world > cores:
            log(d, f"warning: {d.local_world} processes x {threads} threads > {cores} cores; expect a large slow-down")
    if args.dtype == "auto":
        dtype, why = qrwkv.auto_dtype(device)
    else:
        dtype, why = qrwkv.DTYPES[args.dtype], "--dtype"
    log(d, f"compute dtype {str(dtype).removeprefix('torch.')} ({why})")
    return device, dtype


# ----------------------------------------------------------------------------- sharding (--fsdp, SPEC §8)

@dataclass
class Sharding:
    """How --fsdp lays both models out (notes/fsdp2.md): a device mesh (1-D: shard over every process; 2-D
    (replicas, shard) = HSDP), the mixed-precision policy and per-block activation checkpointing of the student."""
    mesh: object
    mp: MixedPrecisionPolicy   # bf16 compute: bf16 all-gathers, fp32 master weights and gradient reductions (replaces autocast)
    checkpoint_blocks: bool


def fsdp_setup(args, d: Dist, device, dtype) -> Sharding | None:
    """--fsdp: the mesh (and, without torchrun, a process group of one: FSDP needs one); None without --fsdp."""
    if not args.fsdp:
        if args.hsdp or args.activation_checkpointing:
            raise ConvertError(f"--{'hsdp' if args.hsdp else 'activation_checkpointing'} needs --fsdp")
        return None
    if args.calibrate:   # calibrate.py runs the teacher's and student's submodules directly: impossible once sharded
        raise ConvertError("--fsdp does not support the calibrated init (calibrate.py needs whole models); pass --calibrate 0")
    replicas = args.hsdp or 1
    if replicas < 0 or d.world % replicas:
        raise ConvertError(f"--hsdp {args.hsdp} must divide the number of processes ({d.world})")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        d.own_group = True
    shape, names = ((d.world,), ("shard",)) if replicas == 1 else ((replicas, d.world // replicas), ("replicate", "shard"))
    bf16 = dtype == torch.bfloat16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None)
    log(d, f"--fsdp: mesh {dict(zip(names, shape))}, compute {'bf16 (fp32 masters and reductions)' if bf16 else 'fp32'}"
           f"{', activation checkpointing' if args.activation_checkpointing else ''}")
    return Sharding(init_device_mesh(device.type, shape, mesh_dim_names=names), mp, args.activation_checkpointing)


def shard_model(model: qrwkv.QRWKV, sh: Sharding, trained: bool):
    """fully_shard each block, then the embedding and the head (one unit when tied: a tied pair split over two units
    fails at the first forward), then the root (left with the final norm). Each unit is gathered only during its own
    forward and backward (the head once per KL chunk); reshard_after_forward=True also on the root, which would
    otherwise keep a frozen model's parameters gathered after a no_grad forward, for the whole run."""
    kw = dict(mesh=sh.mesh, mp_policy=sh.mp, reshard_after_forward=True)
    for block in model.model.layers:
        if trained and sh.checkpoint_blocks:
            checkpoint_module(block)   # composable: recomputes the block in backward, parameter names unchanged
        fully_shard(block, **kw)
    if model.config.tie_word_embeddings:
        fully_shard([model.model.embed_tokens, model.lm_head], **kw)
    else:
        fully_shard(model.model.embed_tokens, **kw)
        fully_shard(model.lm_head, **kw)
    if not trained:   # the KL chunk's recompute in backward runs the frozen head again; FSDP would reshard it only
        model.lm_head.register_forward_hook(lambda head, args, out: head.reshard())   # after gradients it has none of
    fully_shard(model, **kw)


@torch.no_grad()
def put(param, value):
    """param ← value: a plain tensor, or this process's shard of a sharded one. value is full (every process holds the
    same: its shard is sliced out locally, no communication) or a DTensor laid out like param."""
    if isinstance(param, DTensor):
        if not isinstance(value, DTensor):
            value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        param, value = param.to_local(), value.to_local()
    param.copy_(value)


def data_parallel(run, student):
    """The model train_stage runs: the student in DDP under torchrun, else itself. A sharded student synchronises in
    its own backward hooks: it reduce-scatters every micro-batch (train_stage's DDP-only require_backward_grad_sync
    flag is inert on it), as accumulating unsharded gradients would hold full fp32 gradients (notes/fsdp2.md P7)."""
    if isinstance(student, FSDPModule):
        total = lambda m: sum(p.numel() for p in m.parameters())
        log(run.d, f"--fsdp: process 0 holds {local_numel(run.teacher):,} of the teacher's {total(run.teacher):,} parameters "
                   f"and {local_numel(student):,} of the student's {total(student):,}")
    if isinstance(student, FSDPModule) or not run.d.enabled:
        return student
    return DDP(student, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def local_numel(model) -> int:
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())


# ----------------------------------------------------------------------------- teacher and data

def student_autocast(device_type: str, dtype, sharded=False):
    """The context the student's forward runs in: bf16 autocast over fp32 master weights in bf16 runs; off in fp32
    runs and under --fsdp, whose MixedPrecisionPolicy does the casting instead."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16 and not sharded)


def load_teacher(path: str, device, dtype, sharding: Sharding | None = None) -> qrwkv.QRWKV:
    """The frozen teacher in the compute dtype (bf16 halves its memory and, where bf16 is native, its time); under
    --fsdp sharded (`load_sharded_teacher`), carrying its Sharding so the student is laid out alike."""
    try:
        cfg = qrwkv.load_config(path)
        if cfg.is_converted:
            raise ValueError(f"model_type {cfg.model_type} is already a converted QRWKV model; pass the softmax-attention teacher")
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise FileNotFoundError("no tokenizer.json")
        if sharding is None:
            teacher = qrwkv.load_model(path, dtype=dtype, device=device)
        else:
            teacher = load_sharded_teacher(path, cfg, sharding, device, dtype)
    except (ValueError, FileNotFoundError, KeyError, OSError, SafetensorError, RuntimeError, dcp.api.CheckpointException) as e:
        raise ConvertError(f"teacher {path}: {e}".splitlines()[0])   # a corrupt weight file is SafetensorError
    teacher.sharding = sharding
    return teacher.requires_grad_(False)


def load_sharded_teacher(path, cfg, sh: Sharding, device, dtype) -> qrwkv.QRWKV:
    """Built on the meta device, sharded, then only this process's shards read from the Hugging Face safetensors
    (torch.distributed.checkpoint plans each process's slices), so no process ever holds the whole teacher.
    A tied teacher is untied (+V·C/N parameters per process): a tied pair must share one FSDP unit, and a unit of
    several modules reshards only once all of them have run, so [embedding, head] would stay gathered from the
    KL's second chunk to the next teacher forward (measured); apart, the head is gathered for each KL chunk only."""
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise FileNotFoundError(f"{path}: no .safetensors weights; convert .bin checkpoints to safetensors first")
    with torch.device("meta"):   # a tied head gets its own copy of the embedding (below)
        teacher = qrwkv.QRWKV(replace(cfg, tie_word_embeddings=False)).to(dtype)
    shard_model(teacher, sh, trained=False)
    teacher.to_empty(device=device)
    tensors = {n: p.detach() for n, p in teacher.named_parameters()}
    head = tensors.pop("lm_head.weight") if cfg.tie_word_embeddings else None
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(path))
    if head is not None:
        dcp.load({"model.embed_tokens.weight": head}, storage_reader=dcp.HuggingFaceStorageReader(path))
    return teacher.eval()


def prepare_data(d: Dist, data_path: str, teacher_dir: str, out: str, key: dict) -> dict:
    """Tokenise once into OUT/data/{train,val}.bin (uint32) + meta.json; reuse them while `key` is unchanged."""
    ddir = os.path.join(out, "data")
    meta_path = os.path.join(ddir, "meta.json")

    def build():
        if os.path.isfile(meta_path) and json.load(open(meta_path)).get("key") == key:
            return
        from tokenizers import Tokenizer
        docs = prepare.read_documents([s[0] for s in key["sources"]])
        if not docs:
            raise ConvertError(f"data {data_path}: no text found")
        tok = Tokenizer.from_file(os.path.join(teacher_dir, "tokenizer.json"))
        train, val, val_docs = prepare.tokenize_split(docs, tok, key["eos"], key["val_fraction"])
        os.makedirs(ddir, exist_ok=True)
        for name, arr in (("train", train), ("val", val)):
            arr.tofile(os.path.join(ddir, f"{name}.bin.tmp"))
            os.replace(os.path.join(ddir, f"{name}.bin.tmp"), os.path.join(ddir, f"{name}.bin"))
        meta = dict(key=key, docs=len(docs), val_docs=val_docs, train_tokens=int(len(train)), val_tokens=int(len(val)))
        write_json(meta_path, meta)
        log(d, f"data: {len(docs)} documents -> {len(train):,} train / {len(val):,} held-out tokens in {ddir}")

    d.on_master(build)
    meta = json.load(open(meta_path))
    for name in ("train", "val"):
        meta[name] = np.memmap(os.path.join(ddir, f"{name}.bin"), dtype=np.uint32, mode="r")
    return meta


def eval_tokens(args, d):
    """--eval_text tokenised (EOS after each document), for evaluation only; None without one."""
    if not args.eval_text:
        return None
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(args.teacher, "tokenizer.json"))
    docs = prepare.read_documents(prepare.data_files(args.eval_text))
    ids = np.concatenate(prepare.tokenize_documents(docs, tok, prepare.eos_id(args.teacher)) or [np.zeros(0, np.uint32)])
    if len(ids) < 2:
        raise ConvertError(f"--eval_text {args.eval_text}: fewer than 2 tokens")
    return ids


def windows(data, starts, T, device) -> torch.Tensor:
    """(len(starts), T+1) token windows data[s : s+T+1] as int64: inputs are [:, :-1], next-token targets [:, 1:]."""
    x = np.stack([data[s:s + T + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x).to(device, non_blocking=True)


def get_batch(data, *, seed, stage, step, micro, d: Dist, B, T, grad_accum, device):
    """One micro-batch. The global batch of an optimizer step is drawn from (seed, stage, step) alone and sample
    j = (micro·world + rank)·B + b of it goes to this rank, so 2 ranks × B see what 1 rank × 2B sees."""
    starts = np.random.default_rng((seed, stage, step)).integers(0, len(data) - T, size=grad_accum * d.world * B)
    j = (micro * d.world + d.rank) * B
    return windows(data, starts[j:j + B], T, device)


# ----------------------------------------------------------------------------- losses

def chunked_over_tokens(fn, *tensors, chunk):
    """Σ over token chunks of fn(*chunks), tensors (B, T, ...) flattened to (B·T, ...). Under autograd each chunk is
    checkpointed, so only one chunk's (chunk × vocab) logits exist at a time, in forward and in backward."""
    flat = [t.flatten(0, 1) for t in tensors]
    total = 0.0
    for i in range(0, flat[0].shape[0], chunk):
        pieces = [t[i:i + chunk] for t in flat]
        total = total + (checkpoint(fn, *pieces, use_reentrant=False) if torch.is_grad_enabled() else fn(*pieces))
    return total


def kl_divergence(student_logits, teacher_logits) -> torch.Tensor:
    """Σ over tokens of KL(teacher ‖ student) = Σ_v p_t (log p_t − log p_s), temperature 1, log-softmax in fp32."""
    log_ps = F.log_softmax(student_logits.float(), dim=-1)
    log_pt = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="sum")


class LinearKL(torch.autograd.Function):
    """Σ over tokens of KL(softmax(ht Wtᵀ) ‖ softmax(hs Wsᵀ)) (kl_divergence above, from hidden states), chunk by
    chunk, never holding more than one chunk's logits and never computing them twice. The gradient is known in
    forward: ∂KL/∂zs = p_s − p_t, so forward also computes ∂/∂hs = (p_s − p_t) Ws and ∂/∂Ws = (p_s − p_t)ᵀ hs and
    backward only scales them (the fused linear cross-entropy trick). Matmuls in Wt's dtype (the run's compute dtype),
    log-softmax, KL and gradients in fp32. Replaces autograd through chunked_over_tokens(kl_divergence), which
    checkpoints each chunk: two head matmuls and six vocabulary-wide passes more per chunk."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, chunk: int):
        dt = wt.dtype
        with torch.autocast(hs.device.type, enabled=False):
            hs2, ht2, ws_c = hs.detach().flatten(0, 1), ht.detach().flatten(0, 1), ws.detach().to(dt)
            dhs = torch.empty(hs2.shape, dtype=torch.float32, device=hs.device)
            dws = torch.zeros(ws.shape, dtype=torch.float32, device=hs.device) if ctx.needs_input_grad[1] else None
            kl = torch.zeros((), dtype=torch.float64, device=hs.device)
            for i in range(0, hs2.shape[0], chunk):
                h = hs2[i:i + chunk].to(dt)
                ls = (h @ ws_c.T).float()
                lt = (ht2[i:i + chunk].to(dt) @ wt.T).float()
                ls -= ls.logsumexp(-1, keepdim=True)            # log p_s, in place
                lt -= lt.logsumexp(-1, keepdim=True)            # log p_t
                pt = lt.exp()
                kl += torch.dot(pt.view(-1), lt.view(-1)) - torch.dot(pt.view(-1), ls.view(-1))
                g = ls.exp_().sub_(pt).to(dt)                   # ∂KL/∂zs = p_s − p_t
                dhs[i:i + chunk] = g @ ws_c
                if dws is not None:
                    dws += (g.T @ h).float()
        ctx.save_for_backward(dhs.view(hs.shape), dws)
        ctx.hs_dtype = hs.dtype
        return kl.float()

    @staticmethod
    def backward(ctx, grad):
        dhs, dws = ctx.saved_tensors
        return (grad * dhs).to(ctx.hs_dtype), None if dws is None else grad * dws, None, None, None


def converted_layers(model: qrwkv.QRWKV) -> list:
    return [i for i in range(model.config.num_hidden_layers) if i not in model.config.attention_layers]


@torch.no_grad()
def teacher_targets(teacher, ids, layers) -> dict:
    """{layer: (normalised attention input, attention output)} from one teacher forward (the step-1 targets)."""
    with teacher.capture_mixers(layers) as io:
        teacher(ids, return_hidden=True)
    return io


def align_loss(model, run, x, key):
    """Step 1 (teacher-forced): each converted layer's time-mix reads the teacher's normalised attention input and
    learns its attention output; the residual stream is the teacher's. loss = mean over layers and tokens of
    ‖y_teacher − y_student‖₂ / √C. The targets depend only on the batch, so --cache1 keeps them (key = batch id)."""
    layers = converted_layers(run.student)
    io = run.cache1.get(key) or teacher_targets(run.teacher, x[:, :-1], layers)
    if run.args.cache1:
        run.cache1[key] = io
    ys, _ = model(x[:, :-1], mixer_inputs={i: io[i][0] for i in layers})
    err = [(io[i][1].float() - ys[i].float()).norm(dim=-1).mean() for i in layers]
    return torch.stack(err).mean() / math.sqrt(run.teacher.config.hidden_size)


def distill_loss(model, run, x, key):
    """Step 2: mean per-token KL(teacher ‖ student) over the full vocabulary, from final hidden states, in chunks."""
    ids, student, teacher = x[:, :-1], run.student, run.teacher
    with torch.no_grad():
        ht, _ = teacher(ids, return_hidden=True)
    hs, _ = model(ids, return_hidden=True)
    if isinstance(student.lm_head.weight, DTensor):   # --fsdp: the heads are sharded modules, gathered per call
        kl = lambda hs_c, ht_c: kl_divergence(student.lm_head(hs_c), teacher.lm_head(ht_c).detach())
        return chunked_over_tokens(kl, hs, ht, chunk=run.args.kl_chunk) / ids.numel()
    return LinearKL.apply(hs, student.lm_head.weight, ht, teacher.lm_head.weight, run.args.kl_chunk) / ids.numel()


def longctx_loss(model, run, x, key):
    """Step 3: mean next-token cross-entropy on long sequences; no teacher."""
    hs, _ = model(x[:, :-1], return_hidden=True)
    ce = lambda hs_c, t_c: F.cross_entropy(run.student.lm_head(hs_c).float(), t_c, reduction="sum")
    return chunked_over_tokens(ce, hs, x[:, 1:], chunk=run.args.kl_chunk) / x[:, 1:].numel()


@dataclass
class Stage:
    n: int            # 1, 2 or 3
    steps: int
    lr: float
    min_lr: float
    warmup: int
    B: int            # sequences per micro-batch per process
    T: int            # tokens per sequence
    loss: object      # align_loss, distill_loss or longctx_loss
    rest_scale: float = 0.0   # step 2: lr of the non-time-mix parameters / lr of the time-mix (0 = frozen)


def stage_plan(args, n_train_tokens) -> dict:
    return {1: Stage(1, args.steps1, args.lr1, args.min_lr1, args.warmup1, args.batch_size, args.seq_len, align_loss),
            2: Stage(2, args.steps2, args.lr2, args.min_lr2, args.warmup2, args.batch_size, args.seq_len, distill_loss,
                     args.lr2_rest / args.lr2 if args.lr2 > 0 else 0.0),
            3: Stage(3, args.steps3, args.lr3, args.min_lr3, args.warmup3, args.batch_size3,
                     min(args.seq_len3, n_train_tokens - 1), longctx_loss)}


def param_groups(student: qrwkv.QRWKV, stage: int, rest_scale: float) -> list:
    """AdamW groups [time-mix, rest], each with an lr scale. Step 1 trains only the time-mix blocks; step 2 also the
    rest at rest_scale × the time-mix lr (0: frozen, as short runs prefer, SPEC §7); step 3 everything alike.
    requires_grad marks what trains, so frozen parameters get no gradients and DDP syncs none of them."""
    rest_scale = {1: 0.0, 2: rest_scale, 3: 1.0}[stage]
    mixers = [student.model.layers[i].self_attn for i in converted_layers(student)]
    unused = {id(p) for m in mixers for p in getattr(m, "unused_parameters", list)()}   # rwkv7: stored, never read
    mix = [p for m in mixers for p in m.parameters() if id(p) not in unused]
    taken = unused | {id(p) for p in mix}
    rest = [p for p in student.parameters() if id(p) not in taken]
    student.requires_grad_(False)
    for p in mix + (rest if rest_scale > 0 else []):
        p.requires_grad_(True)
    return [dict(params=mix, lr_scale=1.0)] + ([dict(params=rest, lr_scale=rest_scale)] if rest_scale > 0 else [])


def lr_at(step, st: Stage):
    """Linear warm-up to lr, then cosine from lr to min_lr at the last step."""
    if step < st.warmup:
        return st.lr * (step + 1) / st.warmup
    frac = (step - st.warmup) / max(1, st.steps - st.warmup)
    return st.min_lr + 0.5 * (st.lr - st.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(d, args, student, teacher, val, device, amp):
    """Teacher and student perplexity, KL(teacher ‖ student) and top-1 agreement on fixed held-out windows."""
    T = min(args.seq_len, len(val) - 1)
    n = -(-max(1, args.eval_tokens // T) // (d.world * args.batch_size)) * d.world * args.batch_size   # same batches per process
    starts = np.linspace(0, len(val) - T - 1, n).astype(np.int64)[d.rank::d.world]

    def stats(hs, ht, tgt):
        ls, lt = student.lm_head(hs).float(), teacher.lm_head(ht).float()
        return torch.stack([v.double() for v in (F.cross_entropy(lt, tgt, reduction="sum"), F.cross_entropy(ls, tgt, reduction="sum"),
                            kl_divergence(ls, lt), (lt.argmax(-1) == ls.argmax(-1)).sum(), tgt.new_tensor(len(tgt)))])

    was_training = student.training
    student.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)   # ce_teacher, ce_student, kl, agree, tokens
    for b in range(0, len(starts), args.batch_size):
        x = windows(val, starts[b:b + args.batch_size], T, device)
        with amp():
            ht, _ = teacher(x[:, :-1], return_hidden=True)
            hs, _ = student(x[:, :-1], return_hidden=True)
            sums += chunked_over_tokens(stats, hs, ht, x[:, 1:], chunk=args.kl_chunk)
    student.train(was_training)
    ce_t, ce_s, kl, agree, n = d.all_sum(sums).tolist()
    return dict(teacher_ppl=math.exp(ce_t / n), student_ppl=math.exp(min(ce_s / n, 700)), kl=kl / n,
                top1_agree=agree / n, tokens=int(n))


def eval_table(stage, step, r) -> str:
    rows = [f"eval | stage {stage} step {step} | {r['tokens']} held-out tokens"]
    for name, p in (("held-out", ""), ("--eval_text", "text2_")):
        if p + "kl" in r:
            rows.append(f"       {name:11s} perplexity teacher {r[p + 'teacher_ppl']:8.3f} student {r[p + 'student_ppl']:9.3f} "
                        f"(x{r[p + 'student_ppl'] / r[p + 'teacher_ppl']:.2f})  KL {r[p + 'kl']:.4f}  top-1 agreement {100 * r[p + 'top1_agree']:.1f}%")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- run directory, checkpoints

def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def teacher_hash(path: str) -> str:
    """config.json + each weight file's size, first and last MiB: cheap, and differs for other weights."""
    h = hashlib.sha256(open(os.path.join(path, "config.json"), "rb").read())
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            size = os.path.getsize(os.path.join(path, name))
            with open(os.path.join(path, name), "rb") as fh:
                h.update(f"{name}:{size}".encode() + fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read())
    return h.hexdigest()[:16]


def run_identity(args, d, key) -> dict:
    """What the trained model depends on: teacher, tokenizer and data hashes, and every non-free flag."""
    return dict(teacher=teacher_hash(args.teacher), tokenizer=key["tokenizer"],
                data=hashlib.sha256(json.dumps(key["sources"]).encode()).hexdigest()[:16],
                args={k: v for k, v in sorted(vars(args).items()) if k not in FREE_ARGS} | {"world_size": d.world})


@dataclass
class Resume:
    """Where a checkpointed run stands: `step` optimizer steps of `stage` done (`done`: the stage finished)."""
    stage: int
    step: int
    done: bool
    model: dict        # the trainable tensors of that stage (step 1: the time-mix blocks; later: the whole student)
    optimizer: dict
    rng: dict
    args: dict
    attention_layers: tuple   # the layers kept as attention (chosen once when --attention_layers is auto:K)
    sharded: dict | None = None   # --fsdp: the sharded checkpoint folder and how to rebuild the optimizer state (save_sharded)
    elapsed: float = 0.0          # wall-clock seconds of the run so far (all invocations, calibration included)


def save_checkpoint(d: Dist, path, args, identity, stage, step, done, student, optimizer, elapsed=0.0):
    """Atomically write OUT/ckpt.pt: tensors and plain types only (torch.load(weights_only=True) reads it). Under
    --fsdp the tensors go to a sharded checkpoint folder beside it first (`save_sharded`) and ckpt.pt names it."""
    out, tensors = os.path.dirname(path), {}
    if isinstance(student, FSDPModule):
        tensors = dict(sharded=save_sharded(d, out, f"ckpt-{stage}-{step:07d}", student, optimizer))
    elif d.master:
        tensors = dict(model={n: p.detach() for n, p in student.named_parameters() if p.requires_grad},
                       optimizer=optimizer.state_dict())
    if d.master:
        rng = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
        torch.save(dict(format=CKPT_FORMAT, stage=stage, step=step, done=done, rng=rng, args=vars(args), identity=identity,
                        attention_layers=list(student.config.attention_layers), elapsed=elapsed) | tensors, path + ".tmp")
        os.replace(path + ".tmp", path)
        for name in os.listdir(out):   # sharded folders of earlier checkpoints (the new one is named in ckpt.pt now)
            if name.startswith("ckpt-") and name != tensors.get("sharded", {}).get("dir"):
                shutil.rmtree(os.path.join(out, name))
    d.barrier()


def save_sharded(d: Dist, out, name, student, optimizer) -> dict:
    """--fsdp: every process writes its shards of the trained tensors and the AdamW state into OUT/name
    (torch.distributed.checkpoint: any number of processes can read it back). Returns what ckpt.pt records to rebuild
    torch's optimizer state_dict from it: parameter names in the optimizer's order, its groups and state keys."""
    path = os.path.join(out, name)
    if d.master:
        shutil.rmtree(path, ignore_errors=True)   # a folder left by a run killed while writing it
    d.barrier()
    names = {id(p): n for n, p in student.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    opt = optimizer.state_dict()
    model = {n: p.detach() for n, p in student.named_parameters() if p.requires_grad}
    state = {order[i]: s for i, s in opt["state"].items()}
    dcp.save(dict(model=model, optim=state), checkpoint_id=path)
    return dict(dir=name, model=sorted(model), params=order, state=sorted(state), groups=opt["param_groups"],
                state_keys=sorted(next(iter(state.values()), {})))


def load_sharded_resume(student, resume: Resume) -> list:
    """--fsdp: the checkpoint's tensors read into the sharded student (each process its own shards, whatever number of
    processes wrote them) and its AdamW state into resume.optimizer in torch's own state_dict layout (index keys), so
    train_stage loads it as it loads DDP's. Returns the checkpoint's tensor names this student lacks."""
    info, params = resume.sharded, dict(student.named_parameters())
    unexpected = [n for n in info["model"] if n not in params]
    if unexpected:
        return unexpected
    model = {n: params[n].detach() for n in info["model"]}
    state = {n: {k: torch.zeros(()) if k == "step" else torch.zeros_like(params[n]) for k in info["state_keys"]}
             for n in info["state"]}
    dcp.load(dict(model=model, optim=state), checkpoint_id=info["path"])
    index = {n: i for i, n in enumerate(info["params"])}
    resume.optimizer = dict(state={index[n]: s for n, s in state.items()}, param_groups=info["groups"])
    return []


def load_resume(args, identity) -> Resume | None:
    """The checkpoint to continue from, or None for a fresh run. Refuses to overwrite a different run, to restart a
    checkpointed run without --resume, and to resume with another teacher or tokenizer."""
    ckpt_path, run_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "run.json")
    if not os.path.isfile(run_path):
        others = [f for f in os.listdir(args.out) if f not in ("data", "metrics.jsonl")] if os.path.isdir(args.out) else []
        if others:
            raise ConvertError(f"--out {args.out} exists and is not a convert.py run directory (holds {others[0]}); choose another --out")
        return None
    if not os.path.isfile(ckpt_path):      # nothing trained yet (stopped before its first checkpoint): start over
        return None
    prev = json.load(open(run_path))
    diff = [k for k in ("teacher", "tokenizer", "data") if prev.get(k) != identity[k]]
    diff += [f"--{k}" for k in identity["args"] if prev.get("args", {}).get(k) != identity["args"][k]]
    if not args.resume:
        if diff:
            raise ConvertError(f"--out {args.out} holds a different run (differs in {', '.join(diff)}); "
                               f"pass --resume to continue it or choose another --out")
        raise ConvertError(f"--out {args.out} already holds this run with a checkpoint; pass --resume to continue it "
                           f"or delete the directory to start over")
    try:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:   # noqa: BLE001 -- pickled objects (format 1) or a damaged file: both unusable
        raise ConvertError(f"--resume: {ckpt_path} cannot be read safely ({type(e).__name__}); checkpoints of convert.py "
                           f"before format {CKPT_FORMAT} are not resumable: start a new --out")
    if ck.get("format") != CKPT_FORMAT:
        raise ConvertError(f"--resume: {ckpt_path} has format {ck.get('format')}, this convert.py reads {CKPT_FORMAT}; start a new --out")
    for what in ("teacher", "tokenizer"):
        if ck["identity"][what] != identity[what]:
            raise ConvertError(f"--resume: the teacher's {what} differs from the checkpoint's ({what} hash "
                               f"{identity[what]} vs {ck['identity'][what]}); pass the teacher the run was started with")
    if bool(ck.get("sharded")) != args.fsdp:
        raise ConvertError(f"--resume: {ckpt_path} was written {'with' if ck.get('sharded') else 'without'} --fsdp; "
                           f"resume it the same way")
    sharded = ck.get("sharded") and ck["sharded"] | dict(path=os.path.join(args.out, ck["sharded"]["dir"]))
    return Resume(ck["stage"], ck["step"], ck["done"], ck.get("model"), ck.get("optimizer"), ck["rng"], ck["args"],
                  tuple(ck["attention_layers"]), sharded or None, ck.get("elapsed", 0.0))


def build_student(teacher, attention_layers, device, resume: Resume | None, student_kind="rwkv6") -> qrwkv.QRWKV:
    """The one student object of the whole run, fp32 master weights, untied head: built on the meta device and laid
    out like the teacher (sharded under --fsdp), initialised per SPEC §3 from the teacher (`init_from_teacher`), then
    the checkpoint's tensors when resuming (under --fsdp also its optimizer state, into resume.optimizer)."""
    options = qrwkv.rwkv7_student_options(teacher.config, attention_layers) if student_kind == "rwkv7" else {}
    cfg = replace(teacher.config, attention_layers=tuple(attention_layers), tie_word_embeddings=False, **options)
    with torch.device("meta"):
        student = qrwkv.QRWKV(cfg)
    sharding = getattr(teacher, "sharding", None)
    if sharding is not None:
        shard_model(student, sharding, trained=True)
    student.to_empty(device=device)
    init_from_teacher(student, teacher, seed=int(torch.randint(2 ** 31, ())))
    if resume is not None:
        unexpected = load_sharded_resume(student, resume) if sharding else student.load_state_dict(resume.model, strict=False)[1]
        if unexpected:
            raise ConvertError(f"--resume: the checkpoint holds tensors this student lacks, e.g. {unexpected[0]}; "
                               f"it was made with other --attention_layers or another teacher")
        torch.set_rng_state(resume.rng["torch"])
        if resume.rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume.rng["cuda"])
    return student.train()


def init_from_teacher(student, teacher, seed: int):
    """SPEC §3 init, also for a student built on the meta device: every tensor the teacher has (same name) is copied
    from it (each process's shard when sharded: same layout, no communication); the rest (gate, token shift, decay:
    the time-mix's own) from that layer's mixer built alone under seed + layer, the same on every process and layout."""
    src = dict(teacher.named_parameters(remove_duplicate=False))   # a tied teacher's lm_head.weight is its embedding
    for name, p in student.named_parameters():
        if name in src:
            put(p, src[name])
    done = set(src)
    for i, block in enumerate(student.model.layers):
        if i not in student.config.attention_layers:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + i)
                fresh = type(block.self_attn)(student.config, i)
            for name, p in block.self_attn.named_parameters():
                if f"model.layers.{i}.self_attn.{name}" not in src:
                    put(p, fresh.get_parameter(name))
                    done.add(f"model.layers.{i}.self_attn.{name}")
    left = [n for n, _ in student.named_parameters() if n not in done]
    assert not left, f"student tensors with no initial value: {left}"


def init_student(args, d, teacher, train, layers, device, resume: Resume | None) -> qrwkv.QRWKV:
    """The one student: the checkpoint's when resuming; else the SPEC §3 init, calibrated on --calibrate training
    micro-batches (calibrate.py), with auto:K's attention layers chosen by measured damage (`layer_damage`)."""
    if resume is not None or not args.calibrate:
        return build_student(teacher, resume.attention_layers if resume else layers, device, resume, args.student)
    import calibrate
    starts = np.random.default_rng((args.seed, 0)).integers(0, len(train) - args.seq_len, size=args.calibrate)
    batches = [windows(train, [s], args.seq_len, device)[:, :-1] for s in starts]   # the same on every process
    student = build_student(teacher, () if isinstance(layers, int) else layers, device, None, args.student)
    if args.student == "rwkv7":   # unit gate and per-channel output affine (calibrate.calibrate_rwkv7)
        report = calibrate.calibrate_rwkv7(student, teacher, batches, decay=args.calibrate_decay)
    else:   # per-channel readout: the best readout measured on the demo teacher (step-0 ppl 186-93 vs 1.35M uncalibrated)
        report = calibrate.calibrate_student(student, teacher, batches, decay=args.calibrate_decay, readout="channel")
    log(d, f"calibrated {len(report['rel_err_after'])} time-mix blocks on {args.calibrate} x {args.seq_len} tokens: median "
           f"relative error to the teacher's attention {np.median(report['rel_err_before']):.3f} -> {np.median(report['rel_err_after']):.3f}")
    if isinstance(layers, int):   # auto:K: keep as attention the K layers whose conversion alone costs the most
        damage = layer_damage(student, teacher, batches[:2], args.kl_chunk)
        keep = tuple(sorted(np.argsort(damage)[::-1][:layers].tolist()))
        log(d, f"auto:{layers}: keeping layers {list(keep)} as attention; KL when converted alone: "
               + ", ".join(f"{i}:{v:.3f}" for i, v in enumerate(damage)))
        kept = tuple(f"model.layers.{i}.self_attn." for i in keep)
        calibrated = {k: v for k, v in student.state_dict().items() if ".self_attn." in k and not k.startswith(kept)}
        student = build_student(teacher, keep, device, None)
        student.load_state_dict(calibrated, strict=False)
    return student


@torch.no_grad()
def layer_damage(student, teacher, batches, chunk) -> list:
    """For each converted layer i: mean per-token KL(teacher ‖ teacher with only layer i's attention replaced by the
    student's time-mix) on `batches` (training text). Layers 0-1 are known to be the most fragile (SPEC §7)."""
    damage, base = [], [teacher(ids, return_hidden=True)[0] for ids in batches]   # the teacher's own, computed once
    kl = lambda a, b: kl_divergence(teacher.lm_head(a), teacher.lm_head(b))
    for i in range(teacher.config.num_hidden_layers):
        if i in student.config.attention_layers:
            damage.append(0.0)
            continue
        mix = student.model.layers[i].self_attn
        swap = lambda mod, a, out: (mix(*a[:3], None)[0].to(out[0].dtype), out[1])
        total = n = 0
        for ids, ht in zip(batches, base):
            with teacher.model.layers[i].self_attn.register_forward_hook(swap):
                hs, _ = teacher(ids, return_hidden=True)
            total, n = total + chunked_over_tokens(kl, hs, ht, chunk=chunk).item(), n + ids.numel()
        damage.append(total / n)
    return damage


def save_final(d, student, out, teacher_dir, dtype):
    """The converted model into OUT/.final (in the teacher's dtype): qrwkv.save_model, or under --fsdp
    `write_gathered`; then its files are moved into OUT, config.json last."""
    tmp = os.path.join(out, ".final")
    if isinstance(student, FSDPModule):
        write_gathered(d, student, tmp, teacher_dir, dtype)
    elif d.master:
        qrwkv.save_model(student.to(dtype), tmp, tokenizer_dir=teacher_dir)
        student.float()
    if d.master:
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
        for name in os.listdir(out):   # weight files of an earlier save that this one does not replace
            if (name.endswith(".safetensors") or name == "model.safetensors.index.json") and name not in names:
                os.remove(os.path.join(out, name))
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        os.rmdir(tmp)
    d.barrier()


FINAL_SHARD_BYTES = 4 << 30   # the largest safetensors file of the final model under --fsdp (as qrwkv.save_model)


def write_gathered(d, student, tmp, teacher_dir, dtype):
    """--fsdp: the final model as a Hugging Face directory (config.json, safetensors files of at most FINAL_SHARD_BYTES
    with an index when several, tokenizer files) from the sharded student, gathered one tensor at a time (a collective
    every process joins); process 0 writes each file once its tensors are in, so it never holds more than one file."""
    tensors = student.state_dict()   # sharded DTensors, in qrwkv.save_model's order
    files, size = [[]], 0
    for name, t in tensors.items():
        if size and size + t.numel() * dtype.itemsize > FINAL_SHARD_BYTES:
            files, size = files + [[]], 0
        files[-1].append(name)
        size += t.numel() * dtype.itemsize
    fname = lambda i: "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
    if d.master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    for i, names in enumerate(files):
        shard = {}
        for name in names:
            full = tensors[name].full_tensor()
            if d.master:
                shard[name] = full.to("cpu", dtype)
        if d.master:
            save_file(shard, os.path.join(tmp, fname(i)), metadata={"format": "pt"})
    if d.master:
        if len(files) > 1:
            write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       dict(metadata=dict(total_size=sum(t.numel() * dtype.itemsize for t in tensors.values())),
                            weight_map={n: fname(i) for i, names in enumerate(files) for n in names}))
        cfg = replace(student.config, dtype={v: k for k, v in qrwkv.DTYPES.items()}[dtype])
        write_json(os.path.join(tmp, "config.json"), cfg.to_dict())
        for name in qrwkv.TOKENIZER_FILES:
            if os.path.isfile(os.path.join(teacher_dir, name)):
                shutil.copy(os.path.join(teacher_dir, name), tmp)


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------- training

@dataclass
class Run:
    """What every stage shares: arguments, processes, models, data, paths."""
    args: argparse.Namespace
    d: Dist
    device: torch.device
    amp: object            # () -> autocast context (bf16) or a no-op
    teacher: qrwkv.QRWKV
    student: qrwkv.QRWKV
    train: np.ndarray
    val: np.ndarray
    identity: dict
    saved: tuple | None = None   # (stage, step) of the latest checkpoint
    cache1: dict = field(default_factory=dict)   # --cache1: {batch id: step-1 teacher targets}
    eval_text: np.ndarray | None = None          # --eval_text tokens (a second domain)
    clock: tuple = (0.0, 0.0)   # (time.time() when this invocation started, seconds the run had taken before it)

    def elapsed(self) -> float:
        """Wall-clock seconds of the whole run, across --resume, calibration and evaluations included."""
        return self.clock[1] + time.time() - self.clock[0]

    def path(self, name):
        return os.path.join(self.args.out, name)

    def record(self, rec):
        if self.d.master:
            with open(self.path("metrics.jsonl"), "a") as f:
                f.write(json.dumps(rec | dict(elapsed=round(self.elapsed(), 2))) + "\n")

    def eval(self, stage, step):
        r = evaluate(self.d, self.args, self.student, self.teacher, self.val, self.device, self.amp)
        if self.eval_text is not None:
            r |= {f"text2_{k}": v for k, v in evaluate(self.d, self.args, self.student, self.teacher, self.eval_text,
                                                       self.device, self.amp).items()}
        log(self.d, eval_table(stage, step, r))
        self.record(dict(kind="eval", stage=stage, step=step) | r)


def micro_steps(run: Run, st: Stage, model, step: int) -> float:
    """Forward and backward of one optimizer step's micro-batches; returns the loss averaged over all processes."""
    args, d = run.args, run.d
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(args.grad_accum):
        batch_step, batch_micro = step, micro
        if st.n == 1 and args.cache1:   # cycle over the batches of the first --cache1 micro-steps (their targets are kept)
            batch_step, batch_micro = divmod((step * args.grad_accum + micro) % args.cache1, args.grad_accum)
        x = get_batch(run.train, seed=args.seed, stage=st.n, step=batch_step, micro=batch_micro, d=d, B=st.B, T=st.T,
                      grad_accum=args.grad_accum, device=run.device)
        if d.enabled:   # all-reduce gradients on the last micro-step only (what no_sync() does, as a flag)
            model.require_backward_grad_sync = micro == args.grad_accum - 1
        with run.amp():
            loss = st.loss(model, run, x, (batch_step, batch_micro)) / args.grad_accum
        loss.backward()
        loss_sum += loss.detach()
    return d.all_sum(loss_sum).item() / d.world


def train_stage(run: Run, st: Stage, start: int, opt_state, first_eval: bool, budget: int | None) -> int:
    """Optimizer steps start+1..st.steps of one stage, evaluation and checkpoint at the top of each pass (so the
    final ones are not a separate code path). Stops early after `budget` steps. Returns the steps taken."""
    args, d, student = run.args, run.d, run.student
    groups = param_groups(student, st.n, st.rest_scale)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=st.lr, betas=(args.beta1, args.beta2), eps=1e-8,
                                  weight_decay=args.weight_decay, fused=run.device.type == "cuda")
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    # the frozen teacher stays outside DDP; DDP syncs only parameters with requires_grad
    model = data_parallel(run, student)
    tokens_per_step = args.grad_accum * d.world * st.B * st.T
    log(d, f"stage {st.n}: steps {start}..{st.steps}, {tokens_per_step} tokens/step (B {st.B} x T {st.T} x accum "
           f"{args.grad_accum} x {d.world} proc), lr {st.lr:g}->{st.min_lr:g}, {sum(p.numel() for p in params):,} trainable")
    dt_ema, taken = None, 0
    for step in range(start, st.steps + 1):
        last, stop = step == st.steps, budget is not None and taken >= budget
        if args.eval_tokens > 0 and (step > start and (last or args.eval_interval and step % args.eval_interval == 0)
                                     or step == 0 and first_eval):
            run.eval(st.n, step)
        if step > start and (last or stop or step % args.save_interval == 0):
            save_checkpoint(d, run.path("ckpt.pt"), args, run.identity, st.n, step, last, student, optimizer, run.elapsed())
            run.saved = (st.n, step)
        if last or stop:
            return taken
        t0 = time.time()
        lr = lr_at(step, st)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        loss_all = micro_steps(run, st, model, step)
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        if not math.isfinite(loss_all) or not torch.isfinite(gnorm):
            kept = f"kept {run.path('ckpt.pt')} (stage {run.saved[0]} step {run.saved[1]})" if run.saved else "no checkpoint written yet"
            raise ConvertError(f"stage {st.n} step {step + 1}: loss is {loss_all} (grad norm {gnorm.item():.3g}); stopped, "
                               f"{kept}; lower the learning rate and --resume")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        taken += 1
        dt = time.time() - t0
        dt_ema = dt if dt_ema is None else 0.9 * dt_ema + 0.1 * dt
        run.record(dict(kind="train", stage=st.n, step=step + 1, loss=loss_all, lr=lr, grad_norm=gnorm.item(),
                        tok_s=tokens_per_step / dt, time=time.time()))
        if (step + 1) % args.log_interval == 0 or step + 1 == st.steps:
            log(d, f"stage {st.n} | step {step + 1}/{st.steps} | loss {loss_all:.5f} | lr {lr:.2e} | "
                   f"{tokens_per_step / dt_ema:.0f} tok/s | ETA {fmt_time(dt_ema * (st.steps - step - 1))}")


def check_data(args, meta, stages):
    """Refusals that need the tokenised data: at least one batch per stage to run, and a held-out split."""
    for st in stages:
        if len(meta["train"]) < st.B * (st.T + 1):
            raise ConvertError(f"data {args.data}: {len(meta['train'])} training tokens, fewer than one batch of step {st.n} "
                               f"({st.B} x ({st.T} + 1)); add text or lower --seq_len")
    if len(meta["val"]) < 2:
        raise ConvertError(f"data {args.data}: held-out split has {len(meta['val'])} tokens; raise --val_fraction or add documents")


def stages_to_run(args, resume: Resume | None) -> list:
    """[(stage, first step)] for this invocation, from --stage, --steps3 and the checkpoint's position."""
    wanted = [1, 2] + ([3] if args.steps3 > 0 else []) if args.stage == "all" else [int(args.stage)]
    if resume is None:
        return [(s, 0) for s in wanted]
    total = {1: args.steps1, 2: args.steps2, 3: args.steps3}[resume.stage]
    if args.stage != "all" and int(args.stage) < resume.stage:
        raise ConvertError(f"step {args.stage} cannot follow a step-{resume.stage} checkpoint; use another --out")
    current = [(resume.stage, resume.step)] if resume.step < total else []   # unfinished, or extended by larger --steps
    return current + [(s, 0) for s in wanted if s > resume.stage]


def demo_defaults(args, d: Dist):
    """No --teacher/--data: the demo teacher and text from prepare.py (downloaded by rank 0 on first use)."""
    holder = {}

    def fetch():
        try:
            holder["p"] = prepare.prepare()
        except Exception as e:   # noqa: BLE001 -- PrepareError, network, ...: all mean no demo
            raise ConvertError(f"prepare.py could not provide the demo teacher/text: {e}".splitlines()[0])
    d.on_master(fetch)
    t_dir, text = holder["p"] if d.master else prepare.prepare(quiet=True)
    args.teacher, args.data = args.teacher or str(t_dir), args.data or str(text)
    args.out = args.out or DEMO_OUT
    if args.eval_text is None:
        args.eval_text = str(text.parent.parent / prepare.SECOND_REL)


def main(argv=None):
    args = get_args(argv)
    d, ok, t0 = Dist(), False, time.time()
    try:
        device, dtype = pick_device(args, d)
        d.start(device)
        sharding = fsdp_setup(args, d, device, dtype)
        if args.teacher is None or args.data is None:
            demo_defaults(args, d)
        args.out = args.out or args.teacher.rstrip("/") + "-qrwkv"
        teacher = load_teacher(args.teacher, device, dtype, sharding)
        attention_layers = check_args(args, teacher.config.num_hidden_layers)
        amp = lambda: student_autocast(device.type, dtype, sharded=sharding is not None)
        # the run directory: identity, resume point, data
        key = prepare.data_key(args.data, args.teacher, args.val_fraction)
        identity = run_identity(args, d, key)
        resume = load_resume(args, identity)
        d.barrier()
        if d.master:
            os.makedirs(args.out, exist_ok=True)
            write_json(os.path.join(args.out, "run.json"), identity | {"teacher_dir": os.path.abspath(args.teacher),
                                                                        "data_path": os.path.abspath(args.data)})
        meta = prepare_data(d, args.data, args.teacher, args.out, key)
        plan = stage_plan(args, len(meta["train"]))
        todo = stages_to_run(args, resume)
        check_data(args, meta, [plan[s] for s, _ in todo])
        if resume is None:
            torch.manual_seed(args.seed)
        else:
            log(d, f"resuming stage {resume.stage} step {resume.step}{' (done)' if resume.done else ''} from {args.out}/ckpt.pt; "
                   f"changed arguments: {[k for k in resume.args if k in identity['args'] and resume.args[k] != identity['args'][k]] or 'none'}")
        student = init_student(args, d, teacher, meta["train"], attention_layers, device, resume)
        run = Run(args, d, device, amp, teacher, student, meta["train"], meta["val"], identity,
                  saved=(resume.stage, resume.step) if resume else None, eval_text=eval_tokens(args, d),
                  clock=(t0, resume.elapsed if resume else 0.0))
        log(d, f"teacher {args.teacher}: {teacher.config.model_type}, {teacher.config.num_hidden_layers} layers, "
               f"{len(meta['train']):,} train tokens; {d.world} process(es) on {device}; stages {[s for s, _ in todo] or 'none (run complete)'}")
        budget = args.stop_after or None
        for s, start in todo:
            same = resume is not None and s == resume.stage
            taken = train_stage(run, plan[s], start, resume.optimizer if same else None,
                                first_eval=resume is None and s == todo[0][0], budget=budget)
            budget = None if budget is None else budget - taken
            if budget is not None and budget <= 0 and (taken < plan[s].steps - start or s != todo[-1][0]):
                log(d, f"stopped after {args.stop_after} steps (--stop_after); continue with --resume")
                break
        else:
            save_final(d, student, args.out, args.teacher, qrwkv.DTYPES.get(teacher.config.dtype, torch.float32))
            log(d, f"saved the converted model to {args.out} (load with qrwkv.load_model or generate.py --model {args.out})")
        ok = True
    except USER_ERRORS as e:
        raise SystemExit(f"convert.py: error: {e}" if d.master else 1)
    finally:
        d.close(ok)


if __name__ == "__main__":
    main()
