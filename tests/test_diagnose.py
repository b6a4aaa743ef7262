"""titanlite.diagnose: verdicts on recorded and synthetic runs, plots, and the text-only fallback."""

import json
import sys

import numpy as np
import pytest

from titanlite.config import load_config
from titanlite.diagnose import diagnose, main
from titanlite.train import train

from conftest import tiny_config
from test_health import HEALTH_RUN, power_law


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
    assert "data bound" in verdict(write_run(tmp_path / "slow-data", power_law(5000, 4), data_wait_fraction=0.3))
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
    for name in ("loss.png", "grad_norm.png", "lr.png", "throughput.png", "data_wait.png"):
        png = tmp_path / "diagnose" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


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
