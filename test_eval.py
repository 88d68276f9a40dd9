"""
Tests of eval.py's lm-eval backend `qrwkv` on local tasks (YAML over JSONL files written here; no network): on a
tiny random transformers Llama, its log-likelihoods (multiple choice, rolling perplexity) and greedy generations
equal those of lm-eval's own Hugging Face backend on the same directory, accuracies are identical; a converted
model and a hybrid run through it; the front end prints the seeds' table.  Run: `python -m pytest -q test_eval.py`.
"""
import json
import os
import re

os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # local files only

import pytest  # noqa: E402
import torch  # noqa: E402

import qrwkv  # noqa: E402
from conftest import make_corpus, make_teacher, randomize_time_mix  # noqa: E402

import lm_eval  # noqa: E402  (requirements.txt installs it)
import eval as E  # noqa: E402

TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub access even if huggingface_hub / datasets were imported (and read the environment) before this file."""
    import datasets.config
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def write_tasks(root, docs):
    """Three local tasks: multiple choice (acc, acc_norm), rolling perplexity, greedy generation until '.'."""
    words = " ".join(docs).replace(".", "").split()
    mc, gen = [], []
    for i in range(24):
        start = 7 * i % (len(words) - 12)
        true = " " + " ".join(words[start + 4:start + 4 + 1 + i % 3])            # 1-3 words: multi-token answers
        wrong = [" " + " ".join(words[(start + 31 * k) % (len(words) - 3):][:1 + k % 2]) for k in (1, 2, 3)]
        mc.append({"question": " ".join(words[start:start + 4]), "choices": [true] + wrong, "answer": 0})
        gen.append({"question": " ".join(words[start:start + 6]), "answer": " ".join(words[start + 6:start + 8])})
    ppl = [{"text": d} for d in docs[:6]] + [{"text": " ".join(docs[6:40])}]   # the last one spans 3 windows of 512
    common = "dataset_path: json\ntest_split: test\n"
    os.makedirs(root, exist_ok=True)
    specs = {
        "tiny_mc": (mc, "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
        "tiny_ppl": (ppl, "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                          "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
        "tiny_gen": (gen, "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
                          "generation_kwargs:\n  until: ['.', ' seven']\n  max_gen_toks: 8\n  do_sample: false\n"
                          "metric_list:\n  - metric: exact_match\n"),
    }
    for name, (rows, spec) in specs.items():
        data = os.path.join(root, f"{name}.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(os.path.join(root, f"{name}.yaml"), "w") as f:
            f.write(f"task: {name}\n{common}dataset_kwargs:\n  data_files:\n    test: {data}\n{spec}")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    docs = make_corpus()
    teacher = make_teacher(str(root / "teacher"), docs)
    with open(root / "teacher" / "tokenizer_config.json", "w") as f:   # what an HF model directory ships
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "bos_token": "<eos>"}, f)
    t = qrwkv.load_model(teacher, dtype=torch.float32)
    out = {"teacher": teacher, "tasks": write_tasks(str(root / "tasks"), docs)}
    for name, attn in (("converted", ()), ("hybrid", (1,))):
        s = qrwkv.student_from_teacher(t, attention_layers=attn)
        randomize_time_mix(s)
        out[name] = str(root / name)
        qrwkv.save_model(s, out[name], tokenizer_dir=teacher)
    return out


def run(model, model_args, setup, tasks=TASKS, limit=None):
    from lm_eval.tasks import TaskManager
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=2, log_samples=True,
                                   limit=limit,
                                   task_manager=TaskManager(include_path=setup["tasks"], include_defaults=False),
                                   bootstrap_iters=0)


def responses(res, task):
    """{doc_id: the backend's raw answers to the doc's requests}."""
    return {s["doc_id"]: s["resps"] for s in res["samples"][task]}


def lls(resps):
    """The log-likelihoods in one doc's answers: (ll, is_greedy) per choice, or the rolling ll."""
    return torch.tensor([r[0][0] if isinstance(r[0], (list, tuple)) else r[0] for r in resps], dtype=torch.float64)


@pytest.fixture(scope="module")
def hf_and_qrwkv(setup):
    hf = run("hf", f"pretrained={setup['teacher']},dtype=float32,device=cpu", setup)
    ours = run("qrwkv", f"pretrained={setup['teacher']},dtype=float32", setup)   # registered by `import eval`
    return hf, ours


def test_loglikelihoods_equal_hf_backend(hf_and_qrwkv):
    hf, ours = hf_and_qrwkv
    for task in ("tiny_mc", "tiny_ppl"):
        a, b = responses(hf, task), responses(ours, task)
        assert a.keys() == b.keys() and len(a) >= 7
        for doc in a:
            torch.testing.assert_close(lls(b[doc]), lls(a[doc]), rtol=1e-5, atol=1e-4, msg=f"{task} doc {doc}")
    # is_greedy too, and the tasks' metrics: identical accuracies, perplexities within fp32 noise
    greedy = lambda res: [r[0][1] for d in sorted(responses(res, "tiny_mc")) for r in responses(res, "tiny_mc")[d]]
    assert greedy(hf) == greedy(ours)
    for metric in ("acc,none", "acc_norm,none"):
        assert hf["results"]["tiny_mc"][metric] == ours["results"]["tiny_mc"][metric]
    assert 0 < hf["results"]["tiny_mc"]["acc,none"] < 1                 # not a degenerate task
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["tiny_ppl"][metric] == pytest.approx(hf["results"]["tiny_ppl"][metric], rel=1e-5)


def test_generations_equal_hf_backend(hf_and_qrwkv):
    hf, ours = hf_and_qrwkv
    a, b = responses(hf, "tiny_gen"), responses(ours, "tiny_gen")
    assert a == b
    texts = [r[0] for rs in a.values() for r in rs]
    assert any(texts) and not any("." in t or " seven" in t for t in texts)   # cut before the stop strings
    assert hf["results"]["tiny_gen"]["exact_match,none"] == ours["results"]["tiny_gen"]["exact_match,none"]


def test_prefix_state_reuse_matches_full_forwards(setup):
    """Continuations scored from a copied context state (batches smaller than the group, one-token and longer
    continuations, an empty context) equal one full forward per request -- on a converted model and a hybrid."""
    for kind in ("converted", "hybrid"):
        lm = E.QRWKVLM(setup[kind], dtype="float32", batch_size=3)
        ctx = lm.tok_encode("the quick brown fox")
        conts = [lm.tok_encode(c, add_special_tokens=False) for c in (" jumps", " over a lazy", " dog", " the river and", " a")]
        reqs = [(None, ctx, c) for c in conts] + [(None, [lm.prefix_token_id], conts[1])]
        got = lm._loglikelihood_tokens(reqs)
        for (_, c_ids, k_ids), (ll, greedy) in zip(reqs, got):
            with torch.inference_mode():
                logits, _ = lm.model(torch.tensor([c_ids + k_ids]))
            logp = torch.log_softmax(logits[0, len(c_ids) - 1:-1].float(), -1)
            ref = logp.gather(1, torch.tensor(k_ids)[:, None]).sum()
            assert ll == pytest.approx(float(ref), abs=1e-4), (kind, k_ids)
            assert greedy == bool((logp.argmax(-1) == torch.tensor(k_ids)).all())


def test_front_end_table(setup, capsys):
    E.main(["--model", setup["converted"], "--teacher", setup["teacher"], "--tasks", "tiny_mc,tiny_gen",
            "--include_path", setup["tasks"], "--local_tasks_only", "--dtype", "float32", "--limit", "12"])
    out, err = capsys.readouterr()
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): [c.strip() for c in line.strip("|").split("|")[2:]]
            for line in out.splitlines() if line.startswith("| tiny")}
    assert set(rows) == {("tiny_mc", "acc"), ("tiny_mc", "acc_norm"), ("tiny_gen", "exact_match")}, out
    rels = []
    for metric in ("acc", "acc_norm"):
        t, s, rel = rows[("tiny_mc", metric)]
        t, s = float(t), float(s)
        assert rel == (f"{(s - 0.25) / (t - 0.25):.1%}" if t != 0.25 else "-"), (metric, rel, t, s)  # chance: 1 of 4
        rels += [(s - 0.25) / (t - 0.25)] if t != 0.25 else []
    assert rels and f"| mean | | | | {sum(rels) / len(rels):.1%} |" in out, out
    assert rows[("tiny_gen", "exact_match")][2] == "-" or float(rows[("tiny_gen", "exact_match")][0]) > 0
    assert out.splitlines()[0] == "| task | metric | teacher | converted | relative |"
    assert re.search(r"\[qrwkv backend: .*float32 \(dtype=\)", err)


def test_front_end_errors(setup, tmp_path):
    for argv, match in ((["--model", str(tmp_path), "--tasks", "tiny_mc"], "no config.json"),
                        (["--model", setup["converted"], "--tasks", "no_such_task_xyz", "--include_path", setup["tasks"],
                          "--local_tasks_only"],
                         "no_such_task_xyz")):
        with pytest.raises(SystemExit) as e:
            E.main(argv)
        msg = str(e.value.code)
        assert msg.startswith("eval.py: error: ") and "\n" not in msg and match in msg, msg


@pytest.mark.teacher
def test_demo_teacher_equals_hf_backend(setup):
    """The real SmolLM2-135M-Instruct (prepare.py): the same log-likelihoods and accuracies."""
    import prepare
    teacher = str(prepare.prepare(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"), quiet=True)[0])
    hf = run("hf", f"pretrained={teacher},dtype=float32,device=cpu", setup, tasks=["tiny_mc"], limit=8)
    ours = run("qrwkv", f"pretrained={teacher},dtype=float32", setup, tasks=["tiny_mc"], limit=8)
    a, b = responses(hf, "tiny_mc"), responses(ours, "tiny_mc")
    for doc in a:
        torch.testing.assert_close(lls(b[doc]), lls(a[doc]), rtol=1e-5, atol=1e-4, msg=f"doc {doc}")
    assert hf["results"]["tiny_mc"]["acc,none"] == ours["results"]["tiny_mc"]["acc,none"]
    assert hf["results"]["tiny_mc"]["acc_norm,none"] == ours["results"]["tiny_mc"]["acc_norm,none"]
