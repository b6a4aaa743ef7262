"""Compare the loss curves of two titanlite runs on the same data: one JSON line, a CSV, a PNG if possible.

    python bench/compare_losses.py NAME RUN_A RUN_B OUT_FOLDER [--last 50]

RUN_A / RUN_B: dump folders (their metrics.jsonl, logged every step). The JSON line (stdout) gives
each run's mean loss over its last `--last` logged steps and the relative difference of B to A;
OUT_FOLDER/NAME.csv holds both curves (step, loss_a, loss_b), NAME.png plots them when matplotlib
is installed.
"""

import argparse
import csv
import json
import statistics
from pathlib import Path


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--last", type=int, default=50)
    args = parser.parse_args()
    a, b = losses(args.run_a), losses(args.run_b)
    steps = sorted(set(a) & set(b))
    tail = steps[-args.last:]
    mean_a, mean_b = statistics.mean(a[s] for s in tail), statistics.mean(b[s] for s in tail)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{args.name}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", f"loss_{args.run_a.name}", f"loss_{args.run_b.name}"])
        writer.writerows([s, a[s], b[s]] for s in steps)
    plotted = False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.figure(figsize=(7, 4))
        plt.plot(steps, [a[s] for s in steps], label=args.run_a.name)
        plt.plot(steps, [b[s] for s in steps], label=args.run_b.name)
        plt.xlabel("step")
        plt.ylabel("loss")
        plt.legend()
        plt.savefig(args.out / f"{args.name}.png", dpi=100, bbox_inches="tight")
        plotted = True
    except ImportError:
        pass
    print(json.dumps({"comparison": args.name, "run_a": args.run_a.name, "run_b": args.run_b.name,
                      "steps": len(steps), "last": len(tail), "mean_last_a": mean_a, "mean_last_b": mean_b,
                      "relative_difference": (mean_b - mean_a) / mean_a, "plot": plotted}))


if __name__ == "__main__":
    main()
