"""
Sample text from a converted QRWKV model, a hybrid, or a teacher (for comparison): the prompt is prefilled
in one forward (chunked WKV kernel), then tokens are decoded one at a time from the recurrent state, so
per-token cost and memory do not grow with the context in time-mix layers (a teacher decodes with its KV cache).

    python generate.py --prompt "What is the capital of France?"                 # out/smollm2-135m-qrwkv
    python generate.py --model data/smollm2-135m-instruct --prompt "What is the capital of France?"   # teacher
    python generate.py --prompt @prompt.txt --max_new_tokens 400                 # prompt read from a file
    python generate.py --no_chat --prompt "Once upon a time" --temperature 0     # raw completion, greedy
    python generate.py --prompt "Hi" --system "You are a pirate." --num_samples 3 --seed 7 --top_p 0.9

The prompt is wrapped in the model family's chat template (Qwen2.5, Qwen2, Qwen3, SmolLM2/ChatML, Llama 3;
see render_chat) unless --no_chat; --system overrides the default system prompt (--system "" drops it).
Sampling defaults come from the model's generation_config.json when it has them, else DEFAULTS; CLI flags
override both. Generation stops at max_new_tokens or at any EOS id (generation_config.json, config.json,
tokenizer_config.json's eos_token, the template's end-of-turn token); the EOS is not printed.
Text goes to stdout as it is produced; the timing line (prefill and decode tokens/s, state bytes) goes to stderr.

Library use:  chat_family(dir), render_chat(family, msg, system), apply_repetition_penalty(...),
filter_logits(...), sample_next(...), generate_tokens(...), StreamDecoder.   Tests: test_generate.py.
"""
import argparse
import json
import os
import sys
import time

import torch

DEFAULT_MODEL = "out/smollm2-135m-qrwkv"
DEFAULTS = dict(temperature=0.8, top_k=50, top_p=1.0, repetition_penalty=1.0)

# ----------------------------------------------------------------------------- chat templates (no Jinja)

SYSTEM_PROMPTS = {
    "qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "qwen2": "You are a helpful assistant.",
    "qwen3": None,            # no system turn by default
    "smollm2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "chatml": None,           # an unrecognised <|im_start|> template
    "llama3": None,
}
FAMILIES = tuple(SYSTEM_PROMPTS) + ("raw",)
END_OF_TURN = {"llama3": "<|eot_id|>", "raw": None}   # every other family: ChatML's <|im_end|>


def render_chat(family: str, user_msg: str, system: str | None = None) -> str:
    """The prompt string of one user turn plus the assistant header, as the family's chat template renders it
    with add_generation_prompt=True. system=None: the family's default system prompt; "" drops the system turn.
    family "raw" returns user_msg unchanged."""
    if family not in FAMILIES:
        raise ValueError(f"unknown chat family {family!r}; one of {', '.join(FAMILIES)}")
    if family == "raw":
        return user_msg
    system = SYSTEM_PROMPTS[family] if system is None else system
    if family == "llama3":
        s = "<|begin_of_text|>"
        if system:
            s += f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
        return s + f"<|start_header_id|>user<|end_header_id|>\n\n{user_msg}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    s = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return s + f"<|im_start|>user\n{user_msg}<|im_end|>\n<|im_start|>assistant\n"


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def chat_family(model_dir: str) -> str:
    """Which chat template a model directory uses: 'qwen2.5', 'qwen2', 'qwen3', 'smollm2', 'llama3', 'chatml'
    (ChatML tokens but no known family) or 'raw' (no chat tokens). Decided from the tokenizer's special tokens,
    the chat_template text (tokenizer_config.json or chat_template.jinja), config.json's model type and name."""
    tc = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
    cfg = _read_json(os.path.join(model_dir, "config.json"))
    template = tc.get("chat_template") or ""
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        template = " ".join(t.get("template", "") for t in template if isinstance(t, dict))
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, errors="replace") as f:
            template += f.read()
    tokens = set(str(t.get("content", "")) for t in tc.get("added_tokens_decoder", {}).values() if isinstance(t, dict))
    tok = _read_json(os.path.join(model_dir, "tokenizer.json"))
    tokens |= set(str(t.get("content", "")) for t in tok.get("added_tokens", []) if isinstance(t, dict))
    vocab = (tok.get("model") or {}).get("vocab") or {}
    has = lambda t: t in tokens or t in template or (isinstance(vocab, dict) and t in vocab)
    names = " ".join(str(x) for x in (cfg.get("_name_or_path"), tc.get("name_or_path"), tc.get("_name_or_path")) if x).lower()
    family = cfg.get("teacher_model_type") if cfg.get("model_type") == "rwkv6qwen2" else cfg.get("model_type")

    if has("<|start_header_id|>"):
        return "llama3"
    if not has("<|im_start|>"):
        return "raw"
    if SYSTEM_PROMPTS["qwen2.5"] in template:
        return "qwen2.5"
    if "SmolLM" in template:
        return "smollm2"
    if family == "qwen3" or "enable_thinking" in template or "<think>" in template:
        return "qwen3"
    if SYSTEM_PROMPTS["qwen2"] in template:
        return "qwen2"
    for hint, fam in (("smollm", "smollm2"), ("qwen3", "qwen3"), ("qwen2.5", "qwen2.5"), ("qwen", "qwen2")):
        if hint in names:
            return fam
    return "chatml"


# ----------------------------------------------------------------------------- sampling

def apply_repetition_penalty(logits: torch.Tensor, token_ids, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token id in token_ids (prompt and generated so far): a positive logit is
    divided by penalty, a negative one multiplied. logits (V,) or (B, V); returns a new tensor."""
    if penalty == 1.0 or len(token_ids) == 0:
        return logits
    idx = torch.as_tensor(list(set(int(t) for t in token_ids)), dtype=torch.long, device=logits.device)
    out = logits.clone()
    sel = out[..., idx]
    out[..., idx] = torch.where(sel > 0, sel / penalty, sel * penalty)
    return out


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits with everything outside top-k, then outside the nucleus (the smallest set of most likely tokens
    whose probability sum reaches top_p), set to -inf. top_k 0/None and top_p >= 1/None disable. (..., V)."""
    logits = logits.float()
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs      # probability of the more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False                            # always keep the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> int:
    """One token id from logits (V,): argmax when temperature is 0 (ties: lowest id), else a draw from
    softmax(filter_logits(logits / temperature, top_k, top_p))."""
    logits = logits.reshape(-1)
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ----------------------------------------------------------------------------- generation

def prefill(model, ids: torch.Tensor, state=None, chunk_size: int = 0):
    """Run the prompt ids (1, T) through the model (chunk_size > 0: in chunks of that many tokens, bounding memory);
    returns the last position's logits (V,) and the state. Only the last position goes through the LM head."""
    chunks = ids.split(chunk_size, dim=1) if chunk_size and chunk_size > 0 else (ids,)
    for chunk in chunks:
        h, state = model(chunk, state=state, return_hidden=True)
    return model.lm_head(h[0, -1]), state


@torch.inference_mode()
def generate_tokens(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k=None, top_p=None,
                    repetition_penalty: float = 1.0, eos_ids=(), generator=None, stats: dict | None = None,
                    prefilled=None):
    """Yield new token ids one at a time: the prompt is prefilled in one forward, then each token is fed back
    with the state. Stops after max_new_tokens or at a token in eos_ids (not yielded). `prefilled` = (logits,
    state) of an earlier prefill of the same prompt (reused across samples). `stats` (a dict) receives
    prompt_tokens, prefill_s, new_tokens, decode_steps, decode_s, state_bytes."""
    device = next(model.parameters()).device
    prompt_ids = [int(t) for t in prompt_ids]
    eos = set(int(e) for e in eos_ids)
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=len(prompt_ids), prefill_s=0.0, new_tokens=0, decode_steps=0, decode_s=0.0)
    if prefilled is None:
        t0 = time.perf_counter()
        logits, state = prefill(model, torch.tensor([prompt_ids], device=device))
        stats["prefill_s"] = time.perf_counter() - t0
    else:
        logits, state = prefilled
    stats["state_bytes"] = state.nbytes()
    seen = list(prompt_ids)
    for i in range(max_new_tokens):
        tok = sample_next(apply_repetition_penalty(logits, seen, repetition_penalty), temperature, top_k, top_p, generator)
        if tok in eos:
            return
        seen.append(tok)
        stats["new_tokens"] += 1
        yield tok
        if i + 1 == max_new_tokens:
            return
        t0 = time.perf_counter()
        out, state = model(torch.tensor([[tok]], device=device), state=state)
        logits = out[0, -1]
        stats["decode_s"] += time.perf_counter() - t0
        stats["decode_steps"] += 1
        stats["state_bytes"] = state.nbytes()


class StreamDecoder:
    """Turns a stream of token ids into text chunks without broken multi-byte characters: the growing id list is
    decoded and only text past what was already emitted is returned, held back while it ends with U+FFFD (a
    character whose bytes are split across tokens). flush() returns whatever is left at the end."""
    def __init__(self, tokenizer, skip_special_tokens=True):
        self.tokenizer, self.skip, self.ids, self.emitted = tokenizer, skip_special_tokens, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        return self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)) if self.ids else ""

    def _emit(self, text):
        new = text[len(self.emitted):]    # byte-level BPE: earlier text is a prefix of the longer decode
        self.emitted = text
        return new


# ----------------------------------------------------------------------------- loading

def _fail(msg):
    raise SystemExit(f"generate.py: {' '.join(str(msg).split())}")


def load_tokenizer(model_dir: str, vocab_size: int):
    """tokenizers.Tokenizer from model_dir/tokenizer.json, checked against the model's vocab_size."""
    from tokenizers import Tokenizer
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        _fail(f"{model_dir}: no tokenizer.json; copy the teacher's tokenizer files into the model directory")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 -- any parse error is a bad file
        _fail(f"{path}: cannot read the tokenizer ({e})")
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        _fail(f"{model_dir}: tokenizer.json has {n} tokens but the model's vocab_size is {vocab_size}; "
              f"the tokenizer does not belong to this model")
    return tok


def _ids(value):
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def eos_token_ids(model_dir: str, tokenizer, family: str | None = None) -> list:
    """Every id that ends generation: generation_config.json and config.json eos_token_id (int or list),
    tokenizer_config.json's eos_token, and the chat family's end-of-turn token."""
    ids = _ids(_read_json(os.path.join(model_dir, "generation_config.json")).get("eos_token_id"))
    ids += _ids(_read_json(os.path.join(model_dir, "config.json")).get("eos_token_id"))
    eos = _read_json(os.path.join(model_dir, "tokenizer_config.json")).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    names = [eos] if isinstance(eos, str) else []
    if family and family != "raw":
        names.append(END_OF_TURN.get(family, "<|im_end|>"))
    ids += [i for i in (tokenizer.token_to_id(n) for n in names) if i is not None]
    return sorted(set(ids))


def sampling_defaults(model_dir: str) -> dict:
    """DEFAULTS overridden by generation_config.json's temperature/top_k/top_p/repetition_penalty
    (do_sample: false there means greedy)."""
    gc = _read_json(os.path.join(model_dir, "generation_config.json"))
    d = dict(DEFAULTS)
    for k in d:
        if gc.get(k) is not None:
            d[k] = type(d[k])(gc[k])
    if gc.get("do_sample") is False:
        d["temperature"] = 0.0
    return d


def read_prompt(prompt: str) -> str:
    """--prompt TEXT, or --prompt @PATH to read the prompt from a file."""
    if prompt.startswith("@"):
        path = prompt[1:]
        try:
            with open(path, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            _fail(f"--prompt @{path}: cannot read the prompt file ({e})")
    if not prompt.strip():
        _fail("empty prompt; pass --prompt TEXT or --prompt @FILE")
    return prompt


def load(model_dir: str, dtype=None, device="cpu"):
    """(model, tokenizer) with one-line errors for a missing or unreadable directory or a mismatched tokenizer."""
    import qrwkv
    if not os.path.isdir(model_dir):
        if os.path.normpath(model_dir) == os.path.normpath(DEFAULT_MODEL):
            _fail(f"{model_dir} not found; run `python convert.py` first to create the demo conversion, or pass --model DIR")
        _fail(f"--model {model_dir}: no such directory")
    try:
        model = qrwkv.load_model(model_dir, dtype=dtype, device=device)
    except Exception as e:  # noqa: BLE001 -- config/safetensors/shape errors all mean an unreadable model
        _fail(f"--model {model_dir}: cannot load the model ({type(e).__name__}: {e})")
    return model, load_tokenizer(model_dir, model.config.vocab_size)


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"converted, hybrid or teacher directory (default {DEFAULT_MODEL})")
    p.add_argument("--prompt", default="What is the capital of France?", help="prompt text, or @PATH to read it from a file")
    p.add_argument("--no_chat", action="store_true", help="raw completion: do not wrap the prompt in the chat template")
    p.add_argument("--system", default=None, help='system prompt (default: the family\'s; "" for none)')
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate per sample")
    p.add_argument("--num_samples", type=int, default=1, help="independent samples of the same prompt")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config.json, else %s)" % DEFAULTS["temperature"])
    p.add_argument("--top_k", type=int, default=None, help="0 = off (default: generation_config.json, else %s)" % DEFAULTS["top_k"])
    p.add_argument("--top_p", type=float, default=None, help="1 = off (default: generation_config.json, else %s)" % DEFAULTS["top_p"])
    p.add_argument("--repetition_penalty", type=float, default=None, help="1 = off (default: generation_config.json, else 1.0)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (same seed, same text)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default: the checkpoint's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)

    prompt = read_prompt(args.prompt)
    if args.max_new_tokens < 0 or args.num_samples < 1:
        _fail("--max_new_tokens must be >= 0 and --num_samples >= 1")
    import qrwkv
    model, tok = load(args.model, qrwkv.DTYPES[args.dtype] if args.dtype else None, args.device)
    family = "raw" if args.no_chat else chat_family(args.model)
    if args.no_chat:
        ids = tok.encode(prompt, add_special_tokens=True).ids       # e.g. Llama 3's BOS via its post-processor
    else:
        ids = tok.encode(render_chat(family, prompt, args.system), add_special_tokens=False).ids  # BOS is in the text
    if not ids:
        _fail("the prompt encodes to no tokens")
    eos = eos_token_ids(args.model, tok, family)
    opts = sampling_defaults(args.model)
    opts.update({k: getattr(args, k) for k in opts if getattr(args, k) is not None})

    cfg = model.config
    n_attn = len(cfg.attention_layers)
    kind = "teacher" if not cfg.is_converted else ("hybrid" if n_attn else "converted")
    print(f"[{kind} {cfg.model_type}: {cfg.num_hidden_layers - n_attn} time-mix + {n_attn} attention layers; "
          f"chat template {family}; temperature {opts['temperature']}, top_k {opts['top_k']}, top_p {opts['top_p']}, "
          f"repetition_penalty {opts['repetition_penalty']}; eos ids {eos}]", file=sys.stderr)

    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.inference_mode():
        t0 = time.perf_counter()
        prefilled = prefill(model, torch.tensor([ids], device=args.device))
        prefill_s = time.perf_counter() - t0
    for n in range(args.num_samples):
        stats = {}
        stream = StreamDecoder(tok)
        for t in generate_tokens(model, ids, args.max_new_tokens, eos_ids=eos, generator=gen, stats=stats,
                                 prefilled=prefilled, **opts):
            sys.stdout.write(stream.push(t))
            sys.stdout.flush()
        sys.stdout.write(stream.flush() + "\n")
        if args.num_samples > 1:
            sys.stdout.write("---------------\n")
        sys.stdout.flush()
        steps, dec_s = stats["decode_steps"], stats["decode_s"]
        print(f"[prefill {len(ids)} tokens: {len(ids) / max(prefill_s, 1e-9):.1f} tokens/s | decode {stats['new_tokens']} tokens: "
              + (f"{steps / dec_s:.1f} tokens/s" if steps else "n/a tokens/s")
              + f" | state {stats['state_bytes']} bytes at {len(ids) + stats['new_tokens']} tokens]", file=sys.stderr)


if __name__ == "__main__":
    main()
