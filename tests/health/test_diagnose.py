"""titanlite.diagnose: verdicts on recorded and synthetic runs, plots, and the text-only fallback."""

import json
import math
import re
import sys

import numpy as np
import pytest
from conftest import HEALTH_RUN, power_law, tiny_config

from titanlite.config.load import load_config
from titanlite.diagnose import diagnose, main
from titanlite.health.monitor import HealthStop
from titanlite.train import train


def write_run(folder, losses, log_freq=10, **extra_series):
    """A run folder as the trainer writes it: config.json and metrics.jsonl, one record per log step."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(load_config(None).to_dict()))
    with open(folder / "metrics.jsonl", "w") as metrics:
        for index in range(log_freq - 1, len(losses), log_freq):
            record = {"step": index + 1, "loss": float(losses[index]), "grad_norm": 1.0, "lr": 3e-4,
                      "tokens_per_second_per_device": 1000.0, "data_wait_fraction": 0.01, "mfu_percent": 45.0}
            record.update({key: values for key, values in extra_series.items()})
            metrics.write(json.dumps(record) + "\n")
    return folder


def verdict(folder):
    lines, _ = diagnose(folder)
    return "\n".join(lines)


def test_synthetic_runs_get_the_recipe_verdicts(tmp_path):
    healthy = write_run(tmp_path / "healthy", power_law(20000, 0))
    assert verdict(healthy).startswith("healthy")
    spiky = power_law(20000, 1)
    spiky[[2999, 9999]] *= 2.0  # logged steps 3000 and 10000
    assert "spikes at steps 3000, 10000" in verdict(write_run(tmp_path / "spiky", spiky))
    flat = power_law(40000, 2)
    flat[15000:] = 1.85 + np.random.default_rng(0).normal(0, 0.005, 25000)
    text = verdict(write_run(tmp_path / "flat", flat))
    assert "plateau since step" in text and "LR restart" in text
    since = int(text.split("plateau since step ")[1].split()[0])
    assert 14000 <= since <= 17000
    rising = power_law(10000, 3)
    rising[6000:] *= np.exp(np.linspace(0, 2.0, 4000))
    assert "diverged at step" in verdict(write_run(tmp_path / "rising", rising))
    slow_data = verdict(write_run(tmp_path / "slow-data", power_law(5000, 4), data_wait_fraction=0.3))
    assert "data bound" in slow_data and "the device waits for data" in slow_data and "GPU" not in slow_data
    assert "MFU low: 20.0%" in verdict(write_run(tmp_path / "low-mfu", power_law(5000, 5), mfu_percent=20.0))


def test_recorded_run_with_a_nan_is_diverged_and_plotted(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    config = tiny_config(tmp_path, *HEALTH_RUN, "--training.steps", "12", "--metrics.log_freq", "4",
        "--health.inject_nan_at_step", "6", "--health.divergence_action", "log")
    history = train(config)
    assert history[-1]["step"] == 12 and np.isfinite(history[-1]["loss"])  # NaN step skipped, run went on
    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "diverged at step 6 (loss is nan at step 6)" in out and "roll back to the last good checkpoint" in out
    for name in ("loss.png", "grad_norm.png", "lr.png", "throughput.png", "data_wait.png", "overview.png"):
        png = tmp_path / "diagnose" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    from titanlite.health.plots import build_figures

    for figure in build_figures(history, [], 1.0, 0.05, run_name=tmp_path.name).values():
        check_figure_shows_what_it_says(figure)  # a CPU run: no MFU, so "throughput" alone
    assert figure.get_suptitle().startswith(f"{tmp_path.name}: steps 1..12")


def test_verdict_without_matplotlib(tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path / "run", power_law(3000, 6))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    main([str(run)])
    captured = capsys.readouterr()
    assert "healthy" in captured.out and "matplotlib is not installed" in captured.err
    assert not (run / "diagnose").exists()


def test_missing_metrics_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2 and "metrics.jsonl is missing" in capsys.readouterr().err


def test_binary_records_are_one_line_and_cut_lines_one_note(tmp_path, capsys):
    """A binary metrics.jsonl (not UTF-8) is one line, exit 2; lines cut by a crash among good records
    are skipped with one note and the verdict still comes."""
    run = write_run(tmp_path / "run", power_law(300, seed=1))
    good = (run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(bytes(range(256)) * 8 + b"\n\xff\xfe{")
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--no-plots"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and re.fullmatch(rf"titanlite.diagnose: {re.escape(str(run))}/metrics.jsonl holds "
                                                      r"no JSON records \(\d+ lines that are not JSON or not UTF-8 "
                                                      r"text\): it is not the metrics.jsonl of a titanlite run\n", error)
    (run / "metrics.jsonl").write_bytes(good + b'{"step": 301, "lo\xff\n[1, 2]\n')
    main([str(run), "--no-plots"])
    captured = capsys.readouterr()
    assert captured.err == (f"titanlite.diagnose: {run / 'metrics.jsonl'}: skipped 2 lines that are not JSON records "
                            "(the first: line 31)\n")
    assert "healthy" in captured.out
    (run / "health.jsonl").write_bytes(b"\x00\xff" * 64)  # the events are found again from the losses
    main([str(run), "--no-plots"])
    captured = capsys.readouterr()
    assert captured.err.endswith(f"{run / 'health.jsonl'} holds no JSON records (1 line that is not JSON or not "
                                 "UTF-8 text): it is not the health.jsonl of a titanlite run; the logged losses are "
                                 "replayed instead\n") and captured.err.count("\n") == 2
    assert "healthy" in captured.out
    (run / "config.json").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(run), "--no-plots"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith(f"titanlite.diagnose: {run / 'config.json'} cannot be read")
    assert error.count("\n") == 1


# --- rollbacks: what the trainer did, in words and in the plots

ROLLBACK_RUN = [*HEALTH_RUN, "--training.steps", "16", "--metrics.log_freq", "4", "--health.inject_nan_at_step", "8"]


def test_a_stop_with_no_checkpoint_to_roll_back_to_is_not_reported_as_a_rollback(tmp_path):
    with pytest.raises(HealthStop, match="no checkpoint predates step 8"):
        train(tiny_config(tmp_path, *ROLLBACK_RUN))  # divergence_action=rollback, checkpoints off
    text = verdict(tmp_path)
    assert "diverged at step 8" in text and "rolled back" not in text
    assert "no rollback for the divergence at step 8 (no checkpoint predates step 8): the run stopped after step 8" \
        in text


def test_a_rollback_is_reported_and_drawn_as_an_abandoned_branch(tmp_path):
    from titanlite.health.plots import build_figures

    history = train(tiny_config(tmp_path, *ROLLBACK_RUN, "--checkpoint.enable", "true", "--checkpoint.interval", "5"))
    assert [r["step"] for r in history] == [1, 4, 8, 8, 12, 16]  # NaN at 8, back to the step-5 checkpoint
    lines, events = diagnose(tmp_path)
    assert "  the trainer rolled back 1 time(s); LR scale now 0.5" in lines and "no rollback" not in "\n".join(lines)
    figures = build_figures(history, events, grad_clip=1.0, data_wait_limit=0.05)
    loss_axis = figures["loss"].axes[0]
    drawn = {line.get_label(): line for line in loss_axis.lines}
    assert list(drawn["loss"].get_xdata()) == [1, 4, 8, 12, 16]  # the path the run took: never backwards
    assert list(drawn["loss"].get_ydata()) == [r["loss"] for r in history[:2] + history[3:]]
    assert list(drawn["non-finite loss"].get_xdata()) == [8]  # the NaN step that started it, marked
    assert [patch.get_label() for patch in loss_axis.patches] == ["rolled back"]
    for figure in figures.values():
        check_figure_shows_what_it_says(figure)


def test_two_rollback_events_of_one_check_are_one_rollback_not_a_failed_one(tmp_path):
    """A rise from step 7 and a NaN at 12 in one window ask for one rollback; the trainer made it."""
    from titanlite.health.detectors import Event
    from titanlite.health.monitor import HealthMonitor

    write_run(tmp_path, power_law(40, seed=0), rollbacks=1, lr_scale=0.5)
    config = load_config(None)
    monitor = HealthMonitor(config.health, config.training.grad_clip, 0, config.metrics.log_freq, tmp_path, rank=0,
                            device=None)
    monitor.decide([Event(11, "divergence", "loss rising since step 7", 7, 0.1),
                    Event(12, "divergence", "loss is nan at step 12", 12, math.nan)])
    logged = [json.loads(line) for line in (tmp_path / "health.jsonl").read_text().splitlines()]
    assert [e.get("verdict") for e in logged] == ["rollback", None]
    text = verdict(tmp_path)
    assert "rolled back 1 time(s)" in text and "no rollback" not in text


def test_plots_label_each_axis_and_draw_clip_mfu_branches_and_nonfinite_points(tmp_path):
    from titanlite.health.plots import build_figures, split_branches

    def record(step, loss, rollbacks=0, grad_norm=0.5):
        return {"step": step, "loss": loss, "loss_max_step": loss + 0.5, "grad_norm": grad_norm, "lr": 1e-3,
                "rollbacks": rollbacks, "tokens_per_second_per_device": 1000.0 + step, "mfu_percent": 40.0 + step,
                "data_wait_fraction": 0.01}

    # steps 1-4 (NaN at 4), rolled back and replayed 3-6; then a crash after 6 and a resume from a step-5
    # checkpoint: 6 is logged again (the rollback count did not grow: a resume, not a rollback).
    records = [record(1, 8.0), record(2, 7.0), record(3, 6.5), record(4, math.nan, grad_norm=math.inf),
               record(3, 6.4, 1), record(4, 6.0, 1), record(5, 5.5, 1), record(6, 5.2, 1), record(6, 5.3, 1),
               record(7, 5.0, 1)]
    path, abandoned = split_branches(records)
    assert [r["step"] for r in path] == [1, 2, 3, 4, 5, 6, 7] and [r["loss"] for r in path][2:5] == [6.4, 6.0, 5.5]
    assert [([r["step"] for r in b.records], b.cause) for b in abandoned] == [([2, 3, 4], "rollback"),
                                                                              ([5, 6], "resume")]
    figures = build_figures(records, [], grad_clip=1.0, data_wait_limit=0.05)
    assert set(figures) == {"loss", "grad_norm", "lr", "throughput", "data_wait", "overview"}
    labels = {name: figure.axes[0].get_ylabel() for name, figure in figures.items() if name != "overview"}
    assert labels == {"loss": "loss (nats per token)", "grad_norm": "grad norm (L2, before clipping)",
                      "lr": "learning rate", "throughput": "tokens/s per device",
                      "data_wait": "time waiting for data (% of step)"}

    loss = {line.get_label(): line for line in figures["loss"].axes[0].lines}
    assert list(loss["abandoned by a rollback"].get_xdata()) == [2, 3]  # from the last kept step; 4 was NaN
    assert list(loss["abandoned by a rollback"].get_ydata()) == [7.0, 6.5]
    assert list(loss["abandoned by a resume"].get_xdata()) == [5, 6]
    assert list(loss["non-finite loss"].get_xdata()) == [4]
    assert list(loss["worst step of the log window"].get_ydata()) == [r["loss"] + 0.5 for r in path]
    bands = sorted((patch.get_label(), patch.get_x(), patch.get_x() + patch.get_width())
                   for patch in figures["loss"].axes[0].patches)
    assert bands == [("resumed from a checkpoint", 5, 6), ("rolled back", 2, 4)]

    grad = {line.get_label(): line for line in figures["grad_norm"].axes[0].lines}
    assert list(grad["grad_clip = 1"].get_ydata()) == [1.0, 1.0]
    assert list(grad["non-finite grad norm"].get_xdata()) == [4]  # inf, not a point at 3.4e38 or a gap

    left, right = figures["throughput"].axes  # MFU on its own axis, and in the legend
    assert right.get_ylabel() == "MFU (%)"
    assert list(right.lines[0].get_ydata()) == [40.0 + r["step"] for r in path]
    assert {"tokens/s per device", "MFU"} <= {text.get_text() for text in left.get_legend().get_texts()}
    for figure in figures.values():
        import matplotlib.pyplot as plt

        plt.close(figure)


# --- the train/val verdict: a window's mean against the validation loss, overfitting only past one epoch

def evaluated_run(val_losses: dict[int, float], epoch: float | None = None, window_mean: float | None = None,
                  losses=None):
    """Records every 2 steps up to 40 (loss 2.0 unless `losses` has it), val_loss at the steps given."""
    records = []
    for step in range(2, 42, 2):
        record = {"step": step, "loss": (losses or {}).get(step, 2.0)}
        if step in val_losses:
            record["val_loss"] = val_losses[step]
            if window_mean is not None:
                record["loss_window_mean"] = window_mean
        if epoch is not None:
            record["epoch"] = epoch * step / 40
        records.append(record)
    return records


def test_gap_is_judged_on_the_window_not_on_one_noisy_step():
    from titanlite.health.diagnose import validation_lines

    # The case: the last step's loss happens to be low (1.7), the window's mean is 2.0, val 2.05.
    lines = validation_lines(evaluated_run({40: 2.05}, epoch=0.18, window_mean=2.0, losses={40: 1.7}))
    assert lines == ["note: val_loss 2.05 vs 2, the mean training loss of the log window, at step 40"]
    # Without loss_window_mean: the mean of the last 5 logged losses since the previous evaluation.
    losses = {32: 2.4, 34: 2.2, 36: 2.1, 38: 2.0, 40: 1.7}
    lines = validation_lines(evaluated_run({30: 2.4, 40: 2.05}, epoch=0.18, losses=losses))
    expected = np.mean([2.4, 2.2, 2.1, 2.0, 1.7])
    assert lines == [f"note: val_loss 2.05 vs {expected:.4g}, the mean training loss of the 5 logged steps 32..40, "
                     "at step 40"]
    # ... and never records at or before the evaluation before it (step 36 here)
    lines = validation_lines(evaluated_run({36: 2.4, 40: 2.05}, losses=losses))
    assert f"vs {np.mean([2.0, 1.7]):.4g}, the mean training loss of the 2 logged steps 38..40" in lines[0]


def test_overfitting_is_claimed_only_past_one_epoch():
    from titanlite.health.diagnose import validation_lines

    gap = {40: 2.5}  # val 2.5 against a training mean of 2.0: 25% above
    (early,) = validation_lines(evaluated_run(gap, epoch=0.18))
    assert early.startswith("train/val gap within the first epoch (0.18 epochs") and "not overfitting" in early
    assert "drawn like the training data" in early and "fewer epochs" not in early
    (late,) = validation_lines(evaluated_run(gap, epoch=2.5))
    assert late.startswith("overfitting after 2.50 epochs of the training data: val_loss 2.5 vs 2,")
    assert "fewer epochs over it" in late
    (unknown,) = validation_lines(evaluated_run(gap))
    assert unknown.startswith("train/val gap: ") and "no epoch count" in unknown and "overfitting after" not in unknown
    # val rising at 3 evaluations in a row while the training loss falls: overfitting only past one epoch
    rising = {10: 2.0, 20: 2.1, 30: 2.2, 40: 2.3}
    falling = {step: 3.0 - step / 40 for step in range(2, 42, 2)}
    (early,) = validation_lines(evaluated_run(rising, epoch=0.5, losses=falling))
    assert early.startswith("val_loss rising within the first epoch (0.50 epochs")
    (late,) = validation_lines(evaluated_run(rising, epoch=3.0, losses=falling))
    assert late.startswith("overfitting after 3.00 epochs") and "val_loss rose at each of the last 3" in late


def test_diagnose_reports_the_first_epoch_gap_as_a_finding(tmp_path):
    run = write_run(tmp_path / "run", power_law(400, 7), log_freq=10, epoch=0.18)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records[-1]["val_loss"] = 1.5 * records[-1]["loss"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = verdict(run)
    assert "train/val gap within the first epoch" in text and not text.startswith("healthy")


# --- the plots say what they draw

def check_figure_shows_what_it_says(figure):
    """Every panel of `figure` has data; titles, axis labels and legends name only what is drawn."""
    import matplotlib.pyplot as plt

    def has_data(artist):
        if hasattr(artist, "get_ydata"):
            ys = np.asarray(artist.get_ydata(), dtype=float)
            return ys.size > 0 and np.isfinite(ys).any()
        return True  # a band (axvspan) is drawn whenever it exists

    groups = {}  # a panel and its twin (right) axis share one position
    for axis in figure.axes:
        groups.setdefault(tuple(np.round(axis.get_position().bounds, 6)), []).append(axis)
    for axes in groups.values():
        titled = [axis for axis in axes if axis.get_title()]
        assert titled, "an untitled cell: nothing drawn there"
        main = titled[0]
        drawn = [artist for axis in axes for artist in [*axis.lines, *axis.patches]
                 if not artist.get_label().startswith("_") and has_data(artist)]
        labels = {artist.get_label() for artist in drawn}
        assert main.axison and any(line in drawn for line in main.lines), f"empty panel {main.get_title()!r}"
        legend = [text.get_text() for text in main.get_legend().get_texts()]
        assert set(legend) == labels, (main.get_title(), legend, labels)  # listed iff drawn
        assert main.get_xlabel() == "step" and all(axis.get_ylabel() for axis in axes)
        assert ("MFU" in main.get_title()) == ("MFU" in labels)
        assert ("log-log" in main.get_title()) == (main.get_xscale() == main.get_yscale() == "log")
        assert ("log y" in main.get_title()) == (main.get_xscale() == "linear" and main.get_yscale() == "log")
        for artist in drawn:
            if artist.get_label() == "validation loss":
                assert artist.get_marker() == "o"  # a few points: each one visible
            if artist.get_label().startswith("abandoned by"):
                # a branch drawn and listed is not hidden under the final line
                final = dict(zip(main.lines[0].get_xdata(), main.lines[0].get_ydata()))
                assert any(abs(final.get(x, np.inf) - y) > 1e-9 for x, y in zip(artist.get_xdata(),
                                                                                 artist.get_ydata()))
        if "waiting for data" in main.get_title():
            assert "%" in main.get_ylabel() and all("%" in label for label in labels if "threshold" in label)
    plt.close(figure)


def plot_records(with_mfu: bool, resume_changes_loss: bool):
    """Steps 1-30, a NaN at 31 and a rollback to 25 (LR halved), a crash after 50 and a resume from 45
    that replays the same loss and LR (and, if `resume_changes_loss`, another loss)."""
    def record(step, rollbacks=0, replay=False):
        loss = (2 + 8 * step ** -0.5) * 0.98 ** rollbacks * (1.01 if replay and resume_changes_loss else 1)
        r = {"step": step, "loss": loss, "loss_max_step": loss + 0.5, "grad_norm": 0.5, "rollbacks": rollbacks,
             "lr": 1e-3 * 0.5 ** rollbacks * (1 - step / 100), "data_wait_fraction": 0.01 + 0.001 * step,
             "tokens_per_second_per_device": 1000.0 + 10 * step - (50 if replay else 0)}
        if with_mfu:
            r["mfu_percent"] = 40.0 + step / 5
        if step % 10 == 0:
            r["val_loss"] = loss * 1.05
        return r

    records = [record(step) for step in range(1, 31)] + [dict(record(31), loss=math.nan, grad_norm=math.inf)]
    records += [record(step, 1) for step in range(25, 51)] + [record(step, 1, True) for step in range(46, 61)]
    return records


@pytest.mark.parametrize("with_mfu", [False, True], ids=["cpu", "gpu"])
def test_every_figure_shows_what_its_title_and_legend_say(with_mfu):
    from titanlite.health.plots import build_figures

    records = plot_records(with_mfu, resume_changes_loss=False)
    figures = build_figures(records, [], grad_clip=1.0, data_wait_limit=0.05, run_name="demo-run")
    assert figures["throughput"].axes[0].get_title() == ("throughput and MFU" if with_mfu else "throughput")
    # a resume replays the same LR and loss: nothing drawn under the line, nothing listed for it
    for name in ("loss", "lr"):
        assert "abandoned by a resume" not in [t.get_text() for t in figures[name].axes[0].get_legend().get_texts()]
    throughput = {line.get_label(): line for line in figures["throughput"].axes[0].lines}
    assert list(throughput["abandoned by a resume"].get_xdata()) == [45, 46, 47, 48, 49, 50]
    data_wait = {line.get_label(): line for line in figures["data_wait"].axes[0].lines}
    assert np.allclose(data_wait["data wait"].get_ydata()[:3], [100 * (0.01 + 0.001 * s) for s in (1, 2, 3)])
    assert list(data_wait["warning threshold 5%"].get_ydata()) == [5.0, 5.0]
    overview = figures["overview"]
    panels = [axis for axis in overview.axes if axis.get_title()]
    assert [axis.get_title() for axis in panels][0] == "loss (log y axis)" and len(panels) == 5
    assert {axis.get_xscale() for axis in overview.axes} == {"linear"}  # one step axis for every panel
    assert len({tuple(axis.get_xlim()) for axis in overview.axes}) == 1
    assert overview.get_suptitle() == "demo-run: steps 1..60"
    for figure in figures.values():
        check_figure_shows_what_it_says(figure)
    changed = build_figures(plot_records(with_mfu, resume_changes_loss=True), [], 1.0, 0.05)
    assert "abandoned by a resume" in [t.get_text() for t in changed["loss"].axes[0].get_legend().get_texts()]
    for figure in changed.values():
        check_figure_shows_what_it_says(figure)


def test_a_series_no_record_has_gets_no_panel_and_leaves_no_empty_cell():
    from titanlite.health.plots import build_figures

    records = [{key: value for key, value in r.items() if key != "data_wait_fraction"}
               for r in plot_records(with_mfu=False, resume_changes_loss=False)]  # e.g. another trainer's log
    figures = build_figures(records, [], grad_clip=1.0, data_wait_limit=0.05)
    assert set(figures) == {"loss", "grad_norm", "lr", "throughput", "overview"}
    panels = [axis for axis in figures["overview"].axes if axis.get_title()]
    assert [axis.get_title() for axis in panels] == ["loss (log y axis)", "global grad norm before clipping",
                                                     "learning rate", "throughput"]
    # the loss across the top, two panels below it, the third alone: it spans its row as the loss does
    widths = [axis.get_position().width for axis in panels]
    assert widths[3] == pytest.approx(widths[0]) and widths[1] == pytest.approx(widths[2])
    assert widths[1] < 0.6 * widths[0]
    for figure in figures.values():
        check_figure_shows_what_it_says(figure)


def test_a_window_series_equal_to_the_step_series_is_not_drawn_under_it():
    """With log_freq 1 the window's worst step is the step itself: drawn, it hides under the loss line."""
    from titanlite.health.plots import build_figures

    records = [{"step": step, "loss": 8 / step, "loss_max_step": 8 / step, "grad_norm": 1.0 / step,
                "grad_norm_max": 1.0 / step + (0.5 if step == 3 else 0.0)} for step in range(1, 11)]
    figures = build_figures(records, [], grad_clip=1.0, data_wait_limit=0.05)
    assert [line.get_label() for line in figures["loss"].axes[0].lines] == ["loss"]
    grad = {line.get_label(): line for line in figures["grad_norm"].axes[0].lines}
    assert list(grad["largest of the log window"].get_ydata()) == [r["grad_norm_max"] for r in records]
    for figure in figures.values():
        check_figure_shows_what_it_says(figure)
