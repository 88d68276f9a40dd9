"""
Benchmarks through lm-evaluation-harness: the converted model next to its teacher, as the seeds report them.

    python eval.py --model out/smollm2-135m-qrwkv --teacher data/smollm2-135m-instruct \
                   --tasks lambada_openai,hellaswag,arc_easy,arc_challenge,piqa,sciq,winogrande,mmlu
    python eval.py --model OUT --tasks arc_easy --limit 200 --batch_size 8     # first 200 questions, no teacher
    python eval.py --model OUT --tasks my_task --include_path tasks/           # a local task YAML, no network

Prints one row per task and metric (acc, acc_norm, ...): teacher, converted, and the relative score
(s - r) / (t - r) that RADLADS reports, with r the chance level (mean of 1/choices for multiple-choice tasks,
0 for greedy-match accuracies). lm-eval downloads the benchmarks' data sets from the Hugging Face hub on first use
(cached in ~/.cache/huggingface); a task of local files needs no network.

Importing this module registers the model backend `qrwkv` with lm-eval (any directory qrwkv.load_model reads:
teacher, converted, hybrid), taking `pretrained=DIR`, `dtype` (auto, float32, bfloat16, float16), `batch_size`:

    import eval, lm_eval
    lm_eval.simple_evaluate(model="qrwkv", model_args="pretrained=OUT,dtype=float32", tasks=["arc_easy"])

Tests: test_eval.py.
"""
import argparse
import gc
import os
import sys

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (_add_special_kwargs, handle_stop_sequences, has_bos_prefix,
                                      normalize_gen_kwargs, postprocess_generated_text)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the module is nothing without it
    raise ImportError(f"eval.py needs lm-eval ({e}); pip install -r requirements.txt") from None

import generate
import qrwkv


class EvalError(Exception):
    """Bad input (model directory, tasks, arguments): main() prints `eval.py: error: ...`."""


def load_hf_tokenizer(model_dir: str, cfg):
    """The transformers tokenizer lm-eval's HF backend would load for the teacher, also for a converted directory
    (whose config.json model_type transformers does not know: the teacher's type picks the tokenizer class), so
    teacher and converted model score the same token ids."""
    import transformers
    teacher_config = transformers.AutoConfig.for_model(cfg.teacher_model_type)
    return transformers.AutoTokenizer.from_pretrained(model_dir, config=teacher_config)


def repeat_state(state, n: int):
    """n copies of a batch-1 State (each layer's tensors are batch-first), to score n continuations of one context."""
    return qrwkv.State(state.pos, [tuple(t.expand(n, *t.shape[1:]).contiguous() for t in entry) for entry in state.layers])


@register_model("qrwkv")
class QRWKVLM(TemplateLM):
    """lm-eval backend over qrwkv.load_model. Scores like lm-eval's HF backend (same tokenizer, same truncation to
    max_length, same rolling windows), but each distinct context is prefilled once and its continuations are scored
    from copies of that state; generation decodes from the recurrent state (generate.generate_tokens)."""

    def __init__(self, pretrained: str, dtype: str = "auto", batch_size=16, device: str | None = None,
                 max_length: int | None = None, max_batch_size=None):
        super().__init__()
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"   # lm_eval's CLI passes cuda by default
        if dtype == "auto":
            torch_dtype, why = qrwkv.auto_dtype(device)
        elif dtype in qrwkv.DTYPES:
            torch_dtype, why = qrwkv.DTYPES[dtype], "dtype="
        else:
            raise ValueError(f"qrwkv: dtype={dtype!r}; one of auto, {', '.join(qrwkv.DTYPES)}")
        self.model = qrwkv.load_model(pretrained, dtype=torch_dtype, device=device)
        self.tokenizer = load_hf_tokenizer(pretrained, self.model.config)
        self._device, self.pretrained = torch.device(device), pretrained
        self.batch_size = int(batch_size)      # continuations per forward ("auto" is not supported: an int)
        # lm-eval's HF backend: max_position_embeddings, else the tokenizer's model_max_length, else 2048
        self.max_length = int(max_length or self.model.config.raw.get("max_position_embeddings") or 2048)
        self.eos_ids = generate.eos_token_ids(pretrained, self.tokenizer.backend_tokenizer)
        print(f"[qrwkv backend: {pretrained}, {str(torch_dtype).removeprefix('torch.')} ({why}), "
              f"batch_size {self.batch_size}, max_length {self.max_length}]", file=sys.stderr)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # what an empty context is conditioned on, as in lm-eval's HF backend
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.rstrip("/").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list:
        special = _add_special_kwargs(add_special_tokens, None)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False     # the text already starts with BOS
        return self.tokenizer.encode(string, **special)

    def apply_chat_template(self, chat_history: list, add_generation_prompt: bool = True) -> str:
        template = generate.read_chat_template(self.pretrained)
        if template is None:
            raise ValueError(f"{self.pretrained} has no chat template")
        return generate.render_chat(template, chat_history, add_generation_prompt, **generate.special_tokens(self.pretrained))

    def chat_template(self, chat_template=False):
        return generate.read_chat_template(self.pretrained) if chat_template else None

    # ------------------------------------------------------------------------- scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None) -> list:
        """[(log p(continuation | context), continuation is the greedy decode)] for (_, context ids, continuation ids)
        requests. As lm-eval's HF backend, only the last max_length + 1 tokens of context + continuation are used."""
        groups = {}
        for i, (_, ctx, cont) in enumerate(requests):
            keep = self.max_length + 1 - len(cont)            # HF: (ctx + cont)[-(max_length + 1):]
            groups.setdefault(tuple(ctx[-keep:] if len(ctx) > keep else ctx), []).append((i, cont))
        out = [None] * len(requests)
        for ctx, conts in groups.items():
            last_logits, state = generate.prefill(self.model, torch.tensor([ctx], device=self.device))
            for b in range(0, len(conts), self.batch_size):
                batch = conts[b:b + self.batch_size]
                for (i, _), res in zip(batch, self._score(last_logits, state, [c for _, c in batch])):
                    out[i] = res
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
        return out

    @torch.inference_mode()
    def _score(self, last_logits, state, conts: list) -> list:
        """(sum of log-probs, all greedy) of each continuation after the context whose last-position logits and state
        are given: the first token from last_logits, the rest from one right-padded forward of cont[:-1] (causal, so
        padding never reaches a real position) from copies of the state."""
        T = max(len(c) for c in conts) - 1
        if T > 0:
            x = torch.tensor([c[:-1] + [0] * (T - len(c) + 1) for c in conts], device=self.device)
            h, _ = self.model(x, state=repeat_state(state, len(conts)), return_hidden=True)
        res = []
        for j, cont in enumerate(conts):
            logits = last_logits[None] if len(cont) == 1 else torch.cat([last_logits[None], self.model.lm_head(h[j, :len(cont) - 1])])
            logp = torch.log_softmax(logits.float(), dim=-1)
            target = torch.tensor(cont, device=logp.device)
            res.append((float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """log p(text) of each request in lm-eval's windows of max_length tokens (each window conditions on the
        token before it, the first on the prefix token): the numbers lm-eval's HF backend reports."""
        out = []
        for req in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows]))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        """Each context decoded from the recurrent state (greedy unless do_sample) until a stop string, the EOS or
        max_gen_toks; the text is cut before the first stop string, as lm-eval's HF backend does."""
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(gen_kwargs, 256)
            until = handle_stop_sequences(kw.pop("until", None), eos=self.tokenizer.decode(self.eot_token_id))
            max_gen = kw.pop("max_gen_toks")
            ids = self.tok_encode(context)[-(self.max_length - max_gen):]
            new, text = [], ""
            for t in generate.generate_tokens(self.model, ids, max_gen, temperature=kw.get("temperature", 0.0) if
                                              kw.get("do_sample") else 0.0, eos_ids=self.eos_ids + [self.eot_token_id]):
                new.append(t)
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                if any(s and s in text for s in until):
                    break
            text = postprocess_generated_text(text, until, None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out


# ----------------------------------------------------------------------------- the front end

def chance(samples: list, output_type: str) -> float:
    """The expected accuracy of guessing: mean 1/choices over a multiple-choice task's documents, 0 otherwise."""
    if output_type != "multiple_choice" or not samples:
        return 0.0
    return sum(1 / len(s["arguments"]) for s in samples) / len(samples)


def evaluate(model_dir: str, tasks: list, task_manager, args) -> dict:
    """lm-eval results of one model directory: {task: {"metrics": {name: value}, "chance": r}}."""
    import lm_eval
    lm = QRWKVLM(model_dir, dtype=args.dtype, batch_size=args.batch_size, device=args.device)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                  task_manager=task_manager, log_samples=True, bootstrap_iters=0)
    del lm
    gc.collect()
    out = {}
    for task, metrics in res["results"].items():
        subtasks = res.get("group_subtasks", {}).get(task) or [task]
        samples = [s for t in subtasks for s in res["samples"].get(t, [])]
        types = {res["configs"][t]["output_type"] for t in subtasks if t in res["configs"]}
        out[task] = {"metrics": {k.split(",")[0]: v for k, v in metrics.items()
                                 if isinstance(v, (int, float)) and "_stderr" not in k and k != "sample_len"},
                     "chance": chance(samples, "multiple_choice" if types == {"multiple_choice"} else "")}
    return out


def table(teacher: dict | None, converted: dict) -> str:
    """The seeds' table: task, metric, teacher, converted, relative (s - r)/(t - r) for accuracies."""
    rows = ["| task | metric | teacher | converted | relative |", "|---|---|---|---|---|"]
    rel = []
    for task, res in converted.items():
        for metric, s in res["metrics"].items():
            t = teacher[task]["metrics"].get(metric) if teacher and task in teacher else None
            r = res["chance"]
            accuracy = metric.startswith("acc") or metric == "exact_match"
            if t is not None and accuracy and t != r:
                rel.append((s - r) / (t - r))
            cell = f"{rel[-1]:.1%}" if t is not None and accuracy and t != r else "-"
            rows.append(f"| {task} | {metric} | {'-' if t is None else f'{t:.4f}'} | {s:.4f} | {cell} |")
    if rel:
        rows.append(f"| mean | | | | {sum(rel) / len(rel):.1%} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="converted (or hybrid, or any qrwkv.load_model) directory")
    p.add_argument("--teacher", default=None, help="teacher directory to evaluate alongside (default: none)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names, e.g. arc_easy,mmlu")
    p.add_argument("--include_path", default=None, help="directory of extra task YAMLs (local tasks)")
    p.add_argument("--local_tasks_only", action="store_true",
                   help="only the tasks under --include_path (skips indexing lm-eval's built-in tasks, ~40 s)")
    p.add_argument("--num_fewshot", type=int, default=0, help="few-shot examples per question (seeds: 0)")
    p.add_argument("--limit", type=float, default=None, help="first N documents per task (or a fraction if < 1)")
    p.add_argument("--batch_size", type=int, default=16, help="continuations scored per forward")
    p.add_argument("--dtype", default="auto", choices=("auto", *qrwkv.DTYPES),
                   help="auto: bf16 where the device computes it natively, else fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        for d in filter(None, (args.model, args.teacher)):
            if not os.path.isfile(os.path.join(d, "config.json")):
                raise EvalError(f"{d}: no config.json; pass a converted model or teacher directory")
        if not tasks:
            raise EvalError("--tasks: no task names")
        if args.local_tasks_only and not args.include_path:
            raise EvalError("--local_tasks_only needs --include_path")
        from lm_eval.tasks import TaskManager
        tm = TaskManager(include_path=args.include_path, include_defaults=not args.local_tasks_only)
        try:
            teacher = evaluate(args.teacher, tasks, tm, args) if args.teacher else None
            converted = evaluate(args.model, tasks, tm, args)
        except (KeyError, ValueError, OSError) as e:   # unknown task, unreadable model, data set unreachable
            raise EvalError(f"{type(e).__name__}: {e}") from None
    except EvalError as e:
        raise SystemExit(f"eval.py: error: {' '.join(str(e).split())}") from None
    print(table(teacher, converted))


if __name__ == "__main__":
    main()
