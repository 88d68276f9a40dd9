"""
Loss curves of a conversion, from the metrics.jsonl that convert.py writes: step-1 alignment loss and
step-2 KL per optimizer step, with the held-out evaluations marked.

    python plot.py --run out/smollm2-135m-qrwkv --png loss_curves.png
"""
import argparse
import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--run", default=os.path.join("out", "smollm2-135m-qrwkv"), help="convert.py output directory")
    p.add_argument("--png", default="loss_curves.png", help="where to write the figure")
    args = p.parse_args()
    path = os.path.join(args.run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"plot.py: {path} not found; run convert.py first")
    rows = [json.loads(line) for line in open(path)]
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
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
