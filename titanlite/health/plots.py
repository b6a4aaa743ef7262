"""The plots of `titanlite.diagnose`: one panel per signal, from the records of metrics.jsonl.

A run's records are not one curve. After a rollback (or a resume from a checkpoint older than the
last logged step) the steps go back: the records past the restart were abandoned and replayed.
`split_branches` separates the path the run finally took, drawn as the line, from the abandoned
stretches, drawn apart (dashed, grey) over a shaded band: red for a rollback, grey for a resume.
A non-finite value is not dropped silently: it is marked with a red x at the top of the panel.
A title, axis label or legend entry names only what is drawn: no MFU where none was logged (CPU),
no abandoned stretch or window series that would lie hidden under the final line.

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
    title: str  # what the left axis shows; " and <right label>" is added when the right series has data
    ylabel: str
    series: list[tuple[str, str]]
    right: tuple[str, str, str] | None = None  # (key, legend label, axis label)
    loglog: bool = False  # log-log on its own; in the overview, log y over the shared linear step axis
    events: bool = False  # draw the health events
    limit: tuple[float, str] | None = None  # a horizontal reference line: (value as drawn, legend label)
    scale: float = 1.0  # values are drawn times this (fractions as percent)
    marked: tuple[str, ...] = ()  # keys drawn with a marker at each point: sparse series (validation)


def panels(grad_clip: float, data_wait_limit: float) -> list[Panel]:
    """The panels, loss first. `data_wait_limit` is a fraction of the step, drawn in percent as the log prints it."""
    return [
        Panel("loss", "loss", "loss (nats per token)",
              [("loss", "loss"), ("loss_max_step", "worst step of the log window"), ("val_loss", "validation loss")],
              loglog=True, events=True, marked=("val_loss",)),
        Panel("grad_norm", "global grad norm before clipping", "grad norm (L2, before clipping)",
              [("grad_norm", "grad norm"), ("grad_norm_max", "largest of the log window")], events=True,
              limit=(grad_clip, f"grad_clip = {grad_clip:g}") if grad_clip > 0 else None),
        Panel("lr", "learning rate", "learning rate", [("lr", "learning rate")]),
        Panel("throughput", "throughput", "tokens/s per device",
              [("tokens_per_second_per_device", "tokens/s per device")], right=("mfu_percent", "MFU", "MFU (%)")),
        Panel("data_wait", "time waiting for data", "time waiting for data (% of step)",
              [("data_wait_fraction", "data wait")], scale=100.0,
              limit=(100 * data_wait_limit, f"warning threshold {100 * data_wait_limit:g}%")
              if data_wait_limit > 0 else None),
    ]


def points(records: list[dict], key: str, scale: float = 1.0) -> tuple[list[int], list[float], list[int]]:
    """(steps, values x scale) of the finite values of `key`, and the steps where it is inf or NaN."""
    steps, values, nonfinite = [], [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                steps.append(record["step"])
                values.append(value * scale)
            else:
                nonfinite.append(record["step"])
    return steps, values, nonfinite


def has_data(panel: Panel, path: list[dict], abandoned: list[Abandoned]) -> bool:
    """Whether any record has a value (finite or not) for one of the panel's series."""
    keys = [key for key, _ in panel.series] + ([panel.right[0]] if panel.right else [])
    records = path + [record for branch in abandoned for record in branch.records]
    for key in keys:
        steps, _, nonfinite = points(records, key)
        if steps or nonfinite:
            return True
    return False


def hidden_under(steps: list[int], values: list[float], on_path: dict[int, float], log: bool) -> bool:
    """Whether a series lies on a line already drawn (`on_path`, {step: value}) at every one of its steps,
    within a fraction of the line's range: drawn, it would hide under the line yet be listed in the legend.
    A resume replays the same LR (and often the same loss); with log_freq 1 a window's worst is the step."""
    if not on_path or any(step not in on_path for step in steps):
        return False
    log = log and all(v > 0 for v in [*on_path.values(), *values])  # compared as the log axis draws them
    shown = math.log if log else (lambda v: v)
    drawn = [shown(v) for v in on_path.values()]
    tolerance = 0.005 * (max(drawn) - min(drawn)) + 1e-9 * max(abs(v) for v in drawn)  # under a line's width
    return all(abs(shown(on_path[step]) - shown(value)) <= tolerance for step, value in zip(steps, values))


def draw_series(axis, path: list[dict], abandoned: list[Abandoned], key: str, label: str, color: str,
                main: bool = True, scale: float = 1.0, marked: bool = False, log: bool = False,
                beneath: dict[int, float] | None = None) -> dict[int, float]:
    """The final path as a line, abandoned branches dashed, non-finite values as x at the top; returns
    {step: value} as drawn. A secondary series (`main` False) is drawn thinner, behind the line `beneath`,
    and not at all where it lies on it (with log_freq 1 the window's worst step is the step itself).
    A `marked` series has a marker at each point: validation is logged every few hundred steps."""
    steps, values, nonfinite = points(path, key, scale)
    if steps and not (beneath and hidden_under(steps, values, beneath, log)):
        axis.plot(steps, values, color=color, linewidth=1.2 if main or marked else 0.8,
                  alpha=1.0 if main or marked else 0.6, zorder=4 if marked else 3 if main else 2, label=label,
                  marker="o" if marked else None, markersize=4)
    on_path = dict(zip(steps, values))
    for branch in abandoned:
        branch_steps, branch_values, branch_nonfinite = points(branch.records, key, scale)
        if len(branch_steps) > 1 and not hidden_under(branch_steps, branch_values, on_path, log):
            axis.plot(branch_steps, branch_values, color="0.55", linestyle="--", linewidth=1,
                      label=f"abandoned by a {branch.cause}")
        nonfinite += [step for step in branch_nonfinite if step >= branch.first_step]
    if nonfinite:
        axis.plot(sorted(nonfinite), [0.97] * len(nonfinite), linestyle="none", marker="x", markersize=9,
                  color="red", transform=axis.get_xaxis_transform(), clip_on=False, label=f"non-finite {label}")
    return on_path


def draw_panel(axis, panel: Panel, path: list[dict], abandoned: list[Abandoned], events, log_x: bool) -> None:
    """`log_x`: a log step axis (the loss on its own, log-log); False in the overview, whose panels share
    one linear step axis."""
    first: dict[int, float] = {}
    for index, (key, label) in enumerate(panel.series):
        marked = key in panel.marked
        drawn = draw_series(axis, path, abandoned if index == 0 else [], key, label, f"C{index}", main=index == 0,
                            scale=panel.scale, marked=marked, log=panel.loglog,
                            beneath=None if index == 0 or marked else first)
        first = first or drawn
    handles_from = [axis]
    title = panel.title
    if panel.right and points(path, panel.right[0])[0]:
        right = axis.twinx()
        draw_series(right, path, [], panel.right[0], panel.right[1], "C2")  # abandoned stretches: left axis only
        right.set_ylabel(panel.right[2])
        handles_from.append(right)
        title += f" and {panel.right[1]}"
    if panel.limit:
        axis.axhline(panel.limit[0], color="black", linestyle=":", linewidth=1, label=panel.limit[1])
    for branch in abandoned:
        axis.axvspan(branch.records[0]["step"], branch.last_step, color="red" if branch.cause == "rollback" else "0.5",
                     alpha=0.12, label="rolled back" if branch.cause == "rollback" else "resumed from a checkpoint")
    if panel.events:
        for event in events:
            axis.axvline(event.step, color=EVENT_COLORS.get(event.signal, "gray"), alpha=0.6, linestyle="--",
                         linewidth=1, label=event.signal)
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 3 and 10, not 3x10^0 and 10^1
    if panel.loglog:
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(plain)
        axis.yaxis.set_minor_formatter(plain)
        title += " (log-log: healthy is a straight line)" if log_x else " (log y axis)"
    if panel.loglog and log_x:
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(plain)
    axis.set_title(title)
    axis.set_xlabel("step")
    axis.set_ylabel(panel.ylabel)
    legend = {}
    for source in handles_from:
        for handle, label in zip(*source.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        axis.legend(legend.values(), legend.keys(), fontsize=7)


def build_figures(records: list[dict], events, grad_clip: float, data_wait_limit: float,
                  run_name: str = "") -> dict[str, object]:
    """{panel name: matplotlib Figure} for each panel with data, plus "overview" with all of them: the
    loss across the top, the others below, on one linear step axis; `run_name` heads every figure."""
    path, abandoned = split_branches([r for r in records if "step" in r])
    shown = [panel for panel in panels(grad_clip, data_wait_limit) if has_data(panel, path, abandoned)]
    heading = f"{run_name}: steps {path[0]['step']}..{path[-1]['step']}" if run_name and path else run_name
    figures = {}
    for panel in shown:
        figure, axis = plt.subplots(figsize=(8, 4.8))
        draw_panel(axis, panel, path, abandoned, events, log_x=True)
        if heading:
            figure.suptitle(heading, fontsize=9, x=0.01, ha="left")
        figure.tight_layout()
        figures[panel.name] = figure
    rows = 1 + math.ceil((len(shown) - 1) / 2)
    overview = plt.figure(figsize=(12, 3.6 * rows))
    grid = overview.add_gridspec(rows, 2)
    first = None
    for index, panel in enumerate(shown):
        # the first panel spans the top row; the others go two to a row, a last one alone spanning its row
        row, column = (0, None) if index == 0 else (1 + (index - 1) // 2, (index - 1) % 2)
        alone = column == 0 and index == len(shown) - 1
        cell = grid[row, :] if column is None or alone else grid[row, column]
        axis = overview.add_subplot(cell, sharex=first)
        first = first or axis
        draw_panel(axis, panel, path, abandoned, events, log_x=False)
    if heading:
        overview.suptitle(heading)
    overview.tight_layout()
    figures["overview"] = overview
    return figures


def write_plots(folder: Path, records: list[dict], events, grad_clip: float, data_wait_limit: float,
                dpi: int = 100, run_name: str = "") -> list[Path]:
    """PNG files <folder>/<panel>.png and overview.png; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in build_figures(records, events, grad_clip, data_wait_limit, run_name).items():
        figure.savefig(folder / f"{name}.png", dpi=dpi)
        plt.close(figure)
        written.append(folder / f"{name}.png")
    return written
