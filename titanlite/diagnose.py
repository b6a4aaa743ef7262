"""`python -m titanlite.diagnose RUN_DIR`: a verdict on a run in the recipe's terms, and plots.

The findings come from titanlite/health/diagnose.py, the plots from titanlite/health/plots.py
(PNGs in <run>/diagnose/; they need matplotlib: `pip install titanlite[plot]`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from titanlite.health.detectors import Event
from titanlite.health.diagnose import UnreadableRecords, diagnose, read_jsonl, run_settings


def write_plots(run: Path, events: list[Event], dpi: int = 100) -> list[Path]:
    """PNG plots in <run>/diagnose/ (titanlite/health/plots.py); [] when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401  (the optional plot extra)
    except ImportError:
        print("titanlite.diagnose: matplotlib is not installed, no plots (pip install 'titanlite[plot]')",
              file=sys.stderr)
        return []
    from titanlite.health.plots import write_plots as write_panels

    _, grad_clip, _, wait_limit, _ = run_settings(run)
    return write_panels(run / "diagnose", read_jsonl(run / "metrics.jsonl", note=False), events, grad_clip, wait_limit, dpi,
                        run_name=run.resolve().name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titanlite.diagnose", description="Diagnose a titanlite run from its metrics (the recipe's "
                                                 "loss-curve reading) and plot it.")
    parser.add_argument("run", type=Path, help="the run folder (job.dump_folder)")
    parser.add_argument("--no-plots", action="store_true", help="only print the verdict")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the PNG plots")
    args = parser.parse_args(argv)
    try:
        lines, events = diagnose(args.run)
    except (FileNotFoundError, UnreadableRecords) as error:
        print(f"titanlite.diagnose: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.run}:")
    for line in lines:
        print(f"  {line}")
    if not args.no_plots:
        written = write_plots(args.run, events, args.dpi)
        if written:
            print(f"  plots: {', '.join(str(path) for path in written)}")


if __name__ == "__main__":
    main()
