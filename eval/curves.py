"""
Training curves of a train_ddp.py run, as a PNG: the DPO loss, the reward margin and the reward accuracy.

    python -m eval.curves runs/dpo/metrics.jsonl --out runs/dpo/curves.png
"""
import argparse

import common

PANELS = [("loss", "DPO loss (Eq. 7)"), ("rewards/margins", "reward margin: chosen - rejected"),
          ("rewards/accuracies", "reward accuracy: chosen > rejected")]


def smooth(values, window):
    """Trailing moving average, so a noisy per-step curve shows its trend."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot_curves(rows, out, window=5, title=""):
    """One panel per metric: the per-step value (thin) and its moving average (thick)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    steps = [row["step"] for row in rows]
    figure, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.2))
    for axis, (key, label) in zip(axes, PANELS):
        values = [row[key] for row in rows]
        axis.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1, label="each step")
        axis.plot(steps, smooth(values, window), color="tab:blue", linewidth=2, label=f"mean of {window} steps")
        axis.legend(fontsize=8)
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with common.atomic_path(out) as tmp:
        figure.savefig(tmp, dpi=120, format="png")
    plt.close(figure)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("metrics", help="OUT/metrics.jsonl of a train_ddp.py --objective dpo run")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--window", type=int, default=5, help="moving-average window in steps")
    args = p.parse_args(argv)
    rows = common.read_jsonl(args.metrics, appended=True)
    if not rows:
        raise ValueError(f"{args.metrics}: no metrics (is it a train_ddp.py run's OUT/metrics.jsonl?)")
    plot_curves(rows, args.out, args.window, title=f"SeVa's DPO training: {len(rows)} steps")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    common.run_main(main, "eval.curves")
