"""
Figures of conversions, from the metrics.jsonl (and run.json) that convert.py writes into its --out directory.

Loss curves of one run: step-1 alignment loss and step-2 KL per optimizer step, the held-out evaluations marked:

    python plot.py --run out/smollm2-135m-qrwkv --png loss_curves.png

Fidelity against budget, several runs side by side (labels after '='): held-out perplexity ratio, KL(teacher ‖
student) and top-1 agreement of every evaluation, against the tokens trained on and the run's wall-clock minutes
(calibration and evaluations included), on the held-out split (solid) and on --eval_text's second domain (dashed):

    python plot.py --fidelity out/old=old out/new=new out/hybrid="new, K=2" --png fidelity.png
"""
import argparse
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_run(run: str):
    """(run.json's arguments, metrics.jsonl records); a record logged twice (re-run after a kill) keeps its last copy."""
    paths = [os.path.join(run, f) for f in ("run.json", "metrics.jsonl")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"plot.py: {missing[0]} not found; run convert.py first")
    args = json.load(open(paths[0]))["args"]
    records = {}
    for line in open(paths[1]):
        r = json.loads(line)
        records[(r["kind"], r["stage"], r["step"])] = r
    return args, list(records.values())


def trained_tokens(args, stage, step) -> int:
    """Tokens trained on before evaluation (stage, step): all earlier stages' steps, then `step` of this one."""
    per_step = {s: args["batch_size"] * args["seq_len"] * args["grad_accum"] * args["world_size"] for s in (1, 2)}
    per_step[3] = args["batch_size3"] * args["seq_len3"] * args["grad_accum"] * args["world_size"]
    return sum(args[f"steps{s}"] * per_step[s] for s in (1, 2, 3) if s < stage) + step * per_step[stage]


def loss_curves(run):
    _, rows = read_run(run)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, stage, name in ((axes[0], 1, "step 1: attention alignment loss"), (axes[1], 2, "step 2: KL(teacher || student)")):
        train = [r for r in rows if r["kind"] == "train" and r["stage"] == stage]
        evals = [r for r in rows if r["kind"] == "eval" and r["stage"] == stage]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
        if stage == 2:
            ax.plot([r["step"] for r in evals], [r["kl"] for r in evals], "o", label="held-out KL")
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.legend()
    return fig


def fidelity(runs):
    metrics = (("ppl ratio", lambda r, p: r[p + "student_ppl"] / r[p + "teacher_ppl"], "log"),
               ("KL(teacher || student)", lambda r, p: r[p + "kl"], "linear"),
               ("top-1 agreement", lambda r, p: r[p + "top1_agree"], "linear"))
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for i, spec in enumerate(runs):
        run, _, label = spec.partition("=")
        args, rows = read_run(run)
        evals = sorted((r for r in rows if r["kind"] == "eval"), key=lambda r: (r["stage"], r["step"]))
        tokens = [trained_tokens(args, r["stage"], r["step"]) / 1000 for r in evals]
        minutes = [r.get("elapsed", float("nan")) / 60 for r in evals]
        for col, (name, value, scale) in enumerate(metrics):
            for row, x in enumerate((tokens, minutes)):
                ax = axes[row, col]
                for prefix, style, domain in (("", "-o", "held-out"), ("text2_", "--x", "2nd domain")):
                    pts = [(a, value(r, prefix)) for a, r in zip(x, evals) if prefix + "kl" in r]
                    if pts:
                        ax.plot(*zip(*pts), style, color=f"C{i}", markersize=3, label=f"{label or run}, {domain}")
                ax.set_yscale(scale)
                ax.set_xlabel("thousands of tokens trained on" if row == 0 else "wall-clock minutes (2 cores)")
                ax.set_title(name)
                ax.grid(alpha=0.3)
    for ax in axes[:, 0]:   # the interesting range; an uncalibrated init's thousands-fold ratio runs off the top
        ax.set_ylim(0.9, 50)
        ax.axhline(1.0, color="gray", lw=0.8)
    axes[0, 0].legend(fontsize=7)
    return fig


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--run", default=os.path.join("out", "smollm2-135m-qrwkv"), help="convert.py output directory (loss curves)")
    p.add_argument("--fidelity", nargs="+", metavar="DIR[=LABEL]", help="runs to plot fidelity against budget for, instead")
    p.add_argument("--png", default=None, help="where to write the figure (default loss_curves.png / fidelity.png)")
    args = p.parse_args()
    png = args.png or ("fidelity.png" if args.fidelity else "loss_curves.png")
    fig = fidelity(args.fidelity) if args.fidelity else loss_curves(args.run)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
