"""The plots of `titanlite.diagnose`: one panel per signal, from the records of metrics.jsonl.

A run's records are not one curve. After a rollback (or a resume from a checkpoint older than the
last logged step) the steps go back: the records past the restart were abandoned and replayed.
`split_branches` separates the path the run finally took, drawn as the line, from the abandoned
stretches, drawn apart (dashed, grey) over a shaded band: red for a rollback, grey for a resume.
A non-finite value is not dropped silently: it is marked with a red x at the top of the panel.

Needs matplotlib (`pip install 'titanlite[plot]'`); titanlite.diagnose imports this module only
when it can.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import FuncFormatter  # noqa: E402

EVENT_COLORS = {"spike": "tab:orange", "plateau": "tab:purple", "divergence": "tab:red", "grad_norm": "tab:brown"}


@dataclass
class Abandoned:
    """Records a restart abandoned. `records` starts with the last kept record (where the branch
    leaves the final path), when there is one; `cause` is "rollback" or "resume"."""

    records: list[dict]
    cause: str
    first_step: int  # the first abandoned step
    last_step: int  # the step the run was at when it went back


def split_branches(records: list[dict]) -> tuple[list[dict], list[Abandoned]]:
    """(the records of the path the run finally took, in increasing steps; the abandoned stretches).

    A record whose step is not above the previous one starts again from a checkpoint: the records at
    or after its step are cut from the path. The health monitor's `rollbacks` count tells a rollback
    (it grew) from a resume (it did not).
    """
    path: list[dict] = []
    abandoned: list[Abandoned] = []
    for record in records:
        if path and record["step"] <= path[-1]["step"]:
            cut = next(index for index, kept in enumerate(path) if kept["step"] >= record["step"])
            cause = "rollback" if record.get("rollbacks", 0) > path[-1].get("rollbacks", 0) else "resume"
            abandoned.append(Abandoned(path[max(cut - 1, 0):], cause, path[cut]["step"], path[-1]["step"]))
            del path[cut:]
        path.append(record)
    return path, abandoned


@dataclass
class Panel:
    """One plot: series (record key, legend label) on the left axis, an optional one on the right."""

    name: str
    title: str
    ylabel: str
    series: list[tuple[str, str]]
    right: tuple[str, str, str] | None = None  # (key, legend label, axis label)
    loglog: bool = False
    events: bool = False  # draw the health events
    limit: tuple[float, str] | None = None  # a horizontal reference line: (value, legend label)


def panels(grad_clip: float, data_wait_limit: float) -> list[Panel]:
    return [
        Panel("loss", "loss (log-log: healthy is a straight line)", "loss (nats per token)",
              [("loss", "loss"), ("loss_max_step", "worst step of the log window"), ("val_loss", "validation loss")],
              loglog=True, events=True),
        Panel("grad_norm", "global grad norm before clipping", "grad norm (L2, before clipping)",
              [("grad_norm", "grad norm"), ("grad_norm_max", "largest of the log window")], events=True,
              limit=(grad_clip, f"grad_clip = {grad_clip:g}") if grad_clip > 0 else None),
        Panel("lr", "learning rate", "learning rate", [("lr", "learning rate")]),
        Panel("throughput", "throughput and MFU", "tokens/s per device",
              [("tokens_per_second_per_device", "tokens/s per device")], right=("mfu_percent", "MFU", "MFU (%)")),
        Panel("data_wait", "time waiting for data", "share of step time waiting for data",
              [("data_wait_fraction", "data wait")],
              limit=(data_wait_limit, f"warning threshold {data_wait_limit:.0%}") if data_wait_limit > 0 else None),
    ]


def points(records: list[dict], key: str) -> tuple[list[int], list[float], list[int]]:
    """(steps, values) of the finite values of `key`, and the steps where it is inf or NaN."""
    steps, values, nonfinite = [], [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                steps.append(record["step"])
                values.append(value)
            else:
                nonfinite.append(record["step"])
    return steps, values, nonfinite


def draw_series(axis, path: list[dict], abandoned: list[Abandoned], key: str, label: str, color: str,
                main: bool = True) -> None:
    """The final path as a line, abandoned branches dashed, non-finite values as x at the top.
    A secondary series (`main` False) is drawn thinner, behind: with log_freq 1 it equals the main one."""
    steps, values, nonfinite = points(path, key)
    if steps:
        axis.plot(steps, values, color=color, linewidth=1.2 if main else 0.8, alpha=1.0 if main else 0.6,
                  zorder=3 if main else 2, label=label)
    for branch in abandoned:
        branch_steps, branch_values, branch_nonfinite = points(branch.records, key)
        if len(branch_steps) > 1:
            axis.plot(branch_steps, branch_values, color="0.55", linestyle="--", linewidth=1,
                      label=f"abandoned by a {branch.cause}")
        nonfinite += [step for step in branch_nonfinite if step >= branch.first_step]
    if nonfinite:
        axis.plot(sorted(nonfinite), [0.97] * len(nonfinite), linestyle="none", marker="x", markersize=9,
                  color="red", transform=axis.get_xaxis_transform(), clip_on=False, label=f"non-finite {label}")


def draw_panel(axis, panel: Panel, path: list[dict], abandoned: list[Abandoned], events) -> None:
    for index, (key, label) in enumerate(panel.series):
        draw_series(axis, path, abandoned if index == 0 else [], key, label, f"C{index}", main=index == 0)
    handles_from = [axis]
    if panel.right and points(path, panel.right[0])[0]:
        right = axis.twinx()
        draw_series(right, path, [], panel.right[0], panel.right[1], "C2")  # abandoned stretches: left axis only
        right.set_ylabel(panel.right[2])
        handles_from.append(right)
    if panel.limit:
        axis.axhline(panel.limit[0], color="black", linestyle=":", linewidth=1, label=panel.limit[1])
    for branch in abandoned:
        axis.axvspan(branch.records[0]["step"], branch.last_step, color="red" if branch.cause == "rollback" else "0.5",
                     alpha=0.12, label="rolled back" if branch.cause == "rollback" else "resumed from a checkpoint")
    if panel.events:
        for event in events:
            axis.axvline(event.step, color=EVENT_COLORS.get(event.signal, "gray"), alpha=0.6, linestyle="--",
                         linewidth=1, label=event.signal)
    if panel.loglog:
        axis.set_xscale("log")
        axis.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 3 and 4, not 3x10^0 and 4x10^0
        axis.yaxis.set_major_formatter(plain)
        axis.yaxis.set_minor_formatter(plain)
    axis.set_title(panel.title)
    axis.set_xlabel("step")
    axis.set_ylabel(panel.ylabel)
    legend = {}
    for source in handles_from:
        for handle, label in zip(*source.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        axis.legend(legend.values(), legend.keys(), fontsize=7)


def build_figures(records: list[dict], events, grad_clip: float, data_wait_limit: float) -> dict[str, object]:
    """{panel name: matplotlib Figure} for each panel, plus "overview" with every panel in one figure."""
    path, abandoned = split_branches([r for r in records if "step" in r])
    figures = {}
    for panel in panels(grad_clip, data_wait_limit):
        figure, axis = plt.subplots(figsize=(8, 4.5))
        draw_panel(axis, panel, path, abandoned, events)
        figure.tight_layout()
        figures[panel.name] = figure
    overview, axes = plt.subplots(3, 2, figsize=(12, 10))
    for axis, panel in zip(axes.flat, panels(grad_clip, data_wait_limit)):
        draw_panel(axis, panel, path, abandoned, events)
    axes.flat[-1].axis("off")
    overview.tight_layout()
    figures["overview"] = overview
    return figures


def write_plots(folder: Path, records: list[dict], events, grad_clip: float, data_wait_limit: float,
                dpi: int = 100) -> list[Path]:
    """PNG files <folder>/<panel>.png and overview.png; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in build_figures(records, events, grad_clip, data_wait_limit).items():
        figure.savefig(folder / f"{name}.png", dpi=dpi)
        plt.close(figure)
        written.append(folder / f"{name}.png")
    return written
