"""
Sample text from a converted QRWKV model, a hybrid, or a teacher (for comparison): the prompt is prefilled
in one forward (chunked WKV kernel), then tokens are decoded one at a time from the recurrent state, so
per-token cost and memory do not grow with the context in time-mix layers (a teacher decodes with its KV cache).

    python generate.py --prompt "What is the capital of France?"                 # out/smollm2-135m-qrwkv
    python generate.py --model data/smollm2-135m-instruct --prompt "What is the capital of France?"   # teacher
    python generate.py --prompt @prompt.txt --max_new_tokens 400                 # prompt read from a file
    python generate.py --no_chat --prompt "Once upon a time" --temperature 0     # raw completion, greedy
    python generate.py --prompt "Hi" --system "You are a pirate." --num_samples 3 --seed 7 --top_p 0.9
    python generate.py --chat                                                    # multi-turn chat from stdin

The prompt is wrapped in the model directory's own chat template (chat_template.jinja or tokenizer_config.json's
chat_template, rendered in a sandbox as transformers' apply_chat_template does) unless --no_chat or the directory
has none. --chat reads one user turn per line (/reset starts over, end of input ends) and prefills only each
turn's new tokens onto the state carried from the last turn. Sampling defaults come from generation_config.json,
else DEFAULTS; flags override both. Generation stops at max_new_tokens or at any EOS id (generation_config.json,
config.json, tokenizer_config.json's eos_token), which is not printed. Text goes to stdout as it is produced;
the settings and timing lines (prefill and decode tokens/s, state bytes) go to stderr.

Library use: read_chat_template(dir), render_chat(template, messages, **tokens), prefill(...), generate_tokens(...),
chat(...), StreamDecoder, load(dir) -- these raise GenerateError; only main() prints it and exits.
Tests: test_generate.py.
"""
import argparse
import json
import os
import sys
import time
from datetime import datetime

import torch

DEFAULT_MODEL = "out/smollm2-135m-qrwkv"
DEFAULTS = dict(temperature=0.8, top_k=50, top_p=1.0, repetition_penalty=1.0)


class GenerateError(Exception):
    """Bad input (model directory, tokenizer, prompt, chat template): main() prints `generate.py: error: ...`."""


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- chat template (the model's own)

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def read_chat_template(model_dir: str) -> str | None:
    """The directory's chat template: chat_template.jinja (it takes priority, as in transformers), else
    tokenizer_config.json's chat_template (a string, or a list of named templates of which "default" is used)."""
    path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = _read_json(os.path.join(model_dir, "tokenizer_config.json")).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def special_tokens(model_dir: str) -> dict:
    """{"bos_token": "<|im_start|>", ...}: the named special tokens a template sees (transformers passes its
    tokenizer's special_tokens_map), from tokenizer_config.json, else special_tokens_map.json."""
    out = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = _read_json(os.path.join(model_dir, name))
        for key in SPECIAL_TOKEN_NAMES:
            value = cfg.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and key not in out:
                out[key] = value
    return out


def _jinja_env():
    """The sandbox transformers renders chat templates in: trim_blocks/lstrip_blocks, loop controls, its tojson
    (no HTML escaping), raise_exception and strftime_now, and {% generation %} blocks rendered as plain text."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):  # transformers tracks assistant spans here; we only need the text
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def render_chat(template: str, messages: list, add_generation_prompt: bool = True, **variables) -> str:
    """The text of `messages` ([{"role": ..., "content": ...}, ...]) as the chat template renders it, with the
    assistant header appended when add_generation_prompt. `variables` are what transformers passes beside the
    messages: the special tokens (bos_token, eos_token, ...) and template options (enable_thinking=False, ...).
    A template that fails (raise_exception, a syntax error, a bad operation) raises GenerateError."""
    try:
        return _jinja_env().from_string(template).render(messages=messages, tools=None, documents=None,
                                                          add_generation_prompt=add_generation_prompt, **variables)
    except Exception as e:  # noqa: BLE001 -- any failure inside a template is the template's
        raise GenerateError(f"the chat template failed: {type(e).__name__}: {e}") from None


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

def prefill(model, ids: torch.Tensor, state=None, chunk_size: int = 0, stats: dict | None = None):
    """Run the prompt ids (1, T) through the model from `state` (chunk_size > 0: in chunks of that many tokens,
    bounding memory); returns the last position's logits (V,) and the state. Only the last position goes through
    the LM head. `stats` (a dict) receives prompt_tokens and prefill_s: the one place prefill is timed."""
    t0 = time.perf_counter()
    chunks = ids.split(chunk_size, dim=1) if chunk_size and chunk_size > 0 else (ids,)
    with torch.inference_mode():
        for chunk in chunks:
            h, state = model(chunk, state=state, return_hidden=True)
        logits = model.lm_head(h[0, -1])
    if stats is not None:
        stats.update(prompt_tokens=ids.shape[1], prefill_s=time.perf_counter() - t0)
    return logits, state


@torch.inference_mode()
def generate_tokens(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k=None, top_p=None,
                    repetition_penalty: float = 1.0, eos_ids=(), generator=None, stats: dict | None = None,
                    prefilled=None):
    """Yield new token ids one at a time: the prompt is prefilled in one forward (unless `prefilled` = (logits,
    state) of it is given, e.g. reused across samples or carried over chat turns), then each token is fed back with
    the state. Stops after max_new_tokens or at a token in eos_ids (not yielded, not fed). prompt_ids are also the
    repetition penalty's history. `stats` (a dict) receives new_tokens, decode_steps, decode_s, state_bytes
    (and prefill's prompt_tokens, prefill_s) and `state`, the state after the last token fed."""
    device = next(model.parameters()).device
    prompt_ids = [int(t) for t in prompt_ids]
    eos = set(int(e) for e in eos_ids)
    stats = {} if stats is None else stats
    stats.update(new_tokens=0, decode_steps=0, decode_s=0.0)
    logits, state = prefilled or prefill(model, torch.tensor([prompt_ids], device=device), stats=stats)
    stats.update(state=state, state_bytes=state.nbytes())
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
        stats.update(state=state, state_bytes=state.nbytes())


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



def stream_sample(model, tok, prompt_ids, out, stats: dict, **kwargs) -> list:
    """generate_tokens(model, prompt_ids, stats=stats, **kwargs), its text written to `out` as it is produced
    (StreamDecoder), then a newline; returns the new token ids."""
    stream, ids = StreamDecoder(tok), []
    for t in generate_tokens(model, prompt_ids, stats=stats, **kwargs):
        ids.append(t)
        out.write(stream.push(t))
        out.flush()
    out.write(stream.flush() + "\n")
    out.flush()
    return ids


def _rate(n, seconds):
    return f"{n / seconds:.1f} tokens/s" if n and seconds > 0 else "n/a tokens/s"


def tokens_to_feed(tok, text: str, fed: list, fed_text: str) -> list | None:
    """The ids to prefill for the rendered conversation `text` onto a state that has seen the ids `fed` (which spell
    `fed_text`): its own tokens past `fed` when they extend `fed` (the state then equals that of prefilling `text`
    at once); else, when `text` extends `fed_text` (a reply that is not in canonical tokenization), the tokens of
    the rest of the text, so the state keeps the tokens the model generated; None when the template rewrote the
    history (e.g. Qwen3 drops old <think> blocks): then everything must be prefilled again."""
    ids = tok.encode(text, add_special_tokens=False).ids
    if ids[:len(fed)] == fed:
        return ids[len(fed):]
    if text.startswith(fed_text):
        return tok.encode(text[len(fed_text):], add_special_tokens=False).ids
    return None


def chat(model, tok, template: str, lines, out=sys.stdout, err=sys.stderr, system: str | None = None,
         variables: dict | None = None, show_prompt: bool = False, **gen_kwargs) -> list:
    """Multi-turn chat: each line of `lines` is a user turn ("/reset" starts over, blank lines are skipped). The
    conversation is rendered whole with the chat template every turn, but only the tokens the state has not seen
    (tokens_to_feed) are prefilled onto it -- a time-mix state costs the same per turn however long the
    conversation (a teacher's KV cache grows). Prints the reply as it is produced and one cost line per turn to
    `err`. gen_kwargs go to generate_tokens. Returns [(user text, reply ids, ids the state had seen before the reply)]."""
    device = next(model.parameters()).device
    variables = variables or {}
    messages, fed, fed_text, state, turns = [], [], "", None, []
    for line in lines:
        user = line.rstrip("\r\n")
        if user.strip() == "/reset":
            messages, fed, fed_text, state = [], [], "", None
            print("[reset: new conversation]", file=err, flush=True)
        elif user.strip():
            messages.append({"role": "user", "content": user})
            head = [{"role": "system", "content": system}] if system is not None else []
            text = render_chat(template, head + messages, **variables)
            new = tokens_to_feed(tok, text, fed, fed_text)
            if new is None:
                fed, state, new = [], None, tok.encode(text, add_special_tokens=False).ids
                print(f"[the template rewrote the history: prefilling all {len(new)} tokens again]", file=err, flush=True)
            if not new:
                raise GenerateError("the chat template rendered no new tokens for this turn")
            stats, prompt = {}, fed + new
            prefilled = prefill(model, torch.tensor([new], device=device), state=state, stats=stats)
            reply = stream_sample(model, tok, prompt, out, stats, prefilled=prefilled, **gen_kwargs)
            steps = stats["decode_steps"]                      # the last reply token may not be fed yet
            state, fed, fed_text = stats["state"], prompt + reply[:steps], text + tok.decode(reply[:steps])
            messages.append({"role": "assistant", "content": tok.decode(reply)})
            turns.append((user, reply, prompt))
            print(f"[turn {len(messages) // 2}: prefill {len(new)} new tokens: {_rate(len(new), stats['prefill_s'])} | "
                  f"decode {stats['new_tokens']} tokens: {_rate(steps, stats['decode_s'])} | state "
                  f"{stats['state_bytes']} bytes at {len(fed)} tokens]", file=err, flush=True)
        if show_prompt:
            err.write("> ")
            err.flush()
    return turns


# ----------------------------------------------------------------------------- loading

def load_tokenizer(model_dir: str, vocab_size: int):
    """tokenizers.Tokenizer from model_dir/tokenizer.json, checked against the model's vocab_size."""
    from tokenizers import Tokenizer
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise GenerateError(f"{model_dir}: no tokenizer.json; copy the teacher's tokenizer files into the model directory")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 -- any parse error is a bad file
        raise GenerateError(f"{path}: cannot read the tokenizer ({e})") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise GenerateError(f"{model_dir}: tokenizer.json has {n} tokens but the model's vocab_size is {vocab_size}; "
                            f"the tokenizer does not belong to this model")
    return tok


def _ids(value):
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def eos_token_ids(model_dir: str, tokenizer) -> list:
    """Every id that ends generation: generation_config.json and config.json eos_token_id (int or list) and
    tokenizer_config.json's eos_token (for chat models the end-of-turn token, e.g. <|im_end|>, <|eot_id|>)."""
    ids = _ids(_read_json(os.path.join(model_dir, "generation_config.json")).get("eos_token_id"))
    ids += _ids(_read_json(os.path.join(model_dir, "config.json")).get("eos_token_id"))
    eos = special_tokens(model_dir).get("eos_token")
    if eos is not None and tokenizer.token_to_id(eos) is not None:
        ids.append(tokenizer.token_to_id(eos))
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
            raise GenerateError(f"--prompt @{path}: cannot read the prompt file ({e})") from None
    if not prompt.strip():
        raise GenerateError("empty prompt; pass --prompt TEXT or --prompt @FILE")
    return prompt


def load(model_dir: str, dtype=None, device="cpu"):
    """(model, tokenizer) with one-line errors for a missing or unreadable directory or a mismatched tokenizer."""
    import qrwkv
    if not os.path.isdir(model_dir):
        if os.path.normpath(model_dir) == os.path.normpath(DEFAULT_MODEL):
            raise GenerateError(f"{model_dir} not found; run `python convert.py` first to create the demo conversion, "
                                f"or pass --model DIR")
        raise GenerateError(f"--model {model_dir}: no such directory")
    try:
        model = qrwkv.load_model(model_dir, dtype=dtype, device=device)
    except Exception as e:  # noqa: BLE001 -- config/safetensors/shape errors all mean an unreadable model
        raise GenerateError(f"--model {model_dir}: cannot load the model ({type(e).__name__}: {e})") from None
    return model, load_tokenizer(model_dir, model.config.vocab_size)


# ----------------------------------------------------------------------------- CLI

def template_variable(text: str):
    """--template_var KEY=VALUE: VALUE as JSON when it parses (false, 3, "x"), else the plain string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="generate.py", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"converted, hybrid or teacher directory (default {DEFAULT_MODEL})")
    p.add_argument("--prompt", default="What is the capital of France?", help="prompt text, or @PATH to read it from a file")
    p.add_argument("--chat", action="store_true", help="multi-turn chat: one user turn per stdin line, /reset, EOF ends")
    p.add_argument("--no_chat", action="store_true", help="raw completion: do not wrap the prompt in the chat template")
    p.add_argument("--system", default=None, help="system message (default: none, so the template's own default applies)")
    p.add_argument("--template_var", type=template_variable, action="append", default=[],
                   help="KEY=VALUE passed to the chat template, e.g. enable_thinking=false (repeatable)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate per sample (per turn with --chat)")
    p.add_argument("--num_samples", type=int, default=1, help="independent samples of the same prompt")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: generation_config.json, else %s)" % DEFAULTS["temperature"])
    p.add_argument("--top_k", type=int, default=None, help="0 = off (default: generation_config.json, else %s)" % DEFAULTS["top_k"])
    p.add_argument("--top_p", type=float, default=None, help="1 = off (default: generation_config.json, else %s)" % DEFAULTS["top_p"])
    p.add_argument("--repetition_penalty", type=float, default=None, help="1 = off (default: generation_config.json, else 1.0)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (same seed, same text)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights and activations; auto: bf16 where the device computes it natively, else fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    return p.parse_args(argv)


def run(args):
    import qrwkv
    prompt = None if args.chat else read_prompt(args.prompt)
    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise GenerateError("--max_new_tokens must be >= 0 and --num_samples >= 1")
    if args.dtype == "auto":
        dtype, why = qrwkv.auto_dtype(args.device)
    else:
        dtype, why = qrwkv.DTYPES[args.dtype], "--dtype"
    model, tok = load(args.model, dtype, args.device)
    template = None if args.no_chat else read_chat_template(args.model)
    variables = {**special_tokens(args.model), **dict(args.template_var)}
    if args.chat and template is None:
        raise GenerateError(f"--chat needs a chat template; {args.model} has none (no chat_template.jinja, "
                            f"no chat_template in tokenizer_config.json)")
    eos = eos_token_ids(args.model, tok)
    opts = sampling_defaults(args.model)
    opts.update({k: getattr(args, k) for k in opts if getattr(args, k) is not None})

    cfg = model.config
    n_attn = len(cfg.attention_layers)
    kind = "teacher" if not cfg.is_converted else ("hybrid" if n_attn else "converted")
    print(f"[{kind} {cfg.model_type}: {cfg.num_hidden_layers - n_attn} time-mix + {n_attn} attention layers; "
          f"dtype {str(dtype).removeprefix('torch.')} ({why}); "
          f"chat template {'none' if template is None else 'of ' + args.model}; temperature {opts['temperature']}, "
          f"top_k {opts['top_k']}, top_p {opts['top_p']}, repetition_penalty {opts['repetition_penalty']}; "
          f"eos ids {eos}]", file=sys.stderr)
    if template is None and not args.no_chat:
        print(f"[{args.model} has no chat template: the prompt is completed as plain text]", file=sys.stderr)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    kw = dict(max_new_tokens=args.max_new_tokens, eos_ids=eos, generator=gen, **opts)
    if args.chat:
        chat(model, tok, template, sys.stdin, system=args.system, variables=variables, show_prompt=sys.stdin.isatty(), **kw)
        return
    if template is None:
        ids = tok.encode(prompt, add_special_tokens=True).ids       # e.g. Llama 3's BOS via its post-processor
    else:
        head = [{"role": "system", "content": args.system}] if args.system is not None else []
        text = render_chat(template, head + [{"role": "user", "content": prompt}], **variables)
        ids = tok.encode(text, add_special_tokens=False).ids       # the template writes BOS where it wants one
    if not ids:
        raise GenerateError("the prompt encodes to no tokens")
    pstats = {}
    prefilled = prefill(model, torch.tensor([ids], device=args.device), stats=pstats)
    for n in range(args.num_samples):
        stats = {}
        stream_sample(model, tok, ids, sys.stdout, stats, prefilled=prefilled, **kw)
        if args.num_samples > 1:
            print("---------------", flush=True)
        print(f"[prefill {len(ids)} tokens: {_rate(len(ids), pstats['prefill_s'])} | decode {stats['new_tokens']} tokens: "
              f"{_rate(stats['decode_steps'], stats['decode_s'])} | state {stats['state_bytes']} bytes at "
              f"{len(ids) + stats['new_tokens']} tokens]", file=sys.stderr)


def main(argv=None):
    args = get_args(argv)
    try:
        run(args)
    except GenerateError as e:
        raise SystemExit(f"generate.py: error: {' '.join(str(e).split())}") from None


if __name__ == "__main__":
    main()
