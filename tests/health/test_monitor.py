"""Health: detectors on synthetic loss traces, the non-finite step guard, capture and rollback in tiny runs."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import HEALTH_RUN, power_law, tiny_config
from distributed import run_distributed

from titanlite.config.load import load_config
from titanlite.config.settings import Model as ModelConfig
from titanlite.health.detectors import Detectors
from titanlite.health.monitor import HealthMonitor, Verdict
from titanlite.model.transformer import build_model
from titanlite.optim.step import step_unless_nonfinite
from titanlite.train import train, train_step


# The tiny run with the health detectors' inputs: 128 tokens per step, the tokenizer's vocabulary.
def settings(**overrides):
    args = [item for key, value in overrides.items() for item in (f"--health.{key}", str(value))]
    return load_config(None, args).health


def observe(trace, grad_norms=None, skipped=(), warmup_steps=100, **overrides):
    detectors = Detectors(settings(**overrides), grad_clip=1.0, warmup_steps=warmup_steps)
    events = []
    for index, loss in enumerate(trace):
        step = index + 1
        grad_norm = 1.0 if grad_norms is None else float(grad_norms[index])
        events += detectors.observe(step, float(loss), grad_norm, step in skipped)
    return events


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_noisy_traces_raise_nothing(seed):
    noise = (0.01, 0.03, 0.05)[seed]
    grad_norms = np.exp(np.random.default_rng(seed).normal(0.5, 0.6, 6000))  # ~0.5..5: healthy per the recipe
    assert observe(power_law(6000, seed, noise), grad_norms, plateau_window=1000) == []


def test_spikes_are_found_at_their_first_step_only():
    trace = power_law(3000, 3)
    trace[[400, 1500]] *= 2.0  # the recipe's 2.5 -> 5.0
    trace[2200:2203] *= [2.0, 1.8, 1.5]  # a spike that takes three steps to come back: one event
    events = observe(trace, plateau_window=1000)
    assert [(e.signal, e.step) for e in events] == [("spike", 401), ("spike", 1501), ("spike", 2201)]
    assert "early phase" in events[0].message and "early phase" not in events[1].message


def test_loss_ten_times_the_early_maximum_is_a_fault():
    trace = power_law(400, 4)
    trace[300] = 10 * trace[:100].max()
    events = observe(trace, plateau_window=1000)
    assert [(e.signal, e.step) for e in events] == [("spike", 301)] and "fault" in events[0].message


def test_plateau_is_found_with_its_start():
    trace = power_law(6000, 5)
    trace[2500:] = 1.85 + np.random.default_rng(1).normal(0, 0.02, 3500)  # the recipe's 1.85 +- 0.02
    events = observe(trace, plateau_window=1000)
    assert [e.signal for e in events] == ["plateau"]
    assert 2400 <= events[0].start_step <= 2700 and events[0].step <= 4000


def test_divergence_by_sustained_rise_then_nan():
    trace = power_law(3000, 6)
    trace[2000:2200] *= np.exp(np.linspace(0, 1.4, 200))  # 3.0 -> 4.5 -> 10 ...
    trace[2200] = math.nan
    events = observe(trace[:2201], plateau_window=1000)
    divergences = [e for e in events if e.signal == "divergence"]
    assert len(divergences) == 2 and 2000 < divergences[0].step < 2200 and "sustained rise" in divergences[0].message
    assert divergences[1].step == 2201 and "nan" in divergences[1].message


def test_repeated_overflow_is_divergence_but_occasional_is_not():
    trace = power_law(1000, 7)
    assert observe(trace, skipped={200, 450, 700}, plateau_window=1000) == []
    events = observe(trace, skipped=set(range(500, 520, 3)), plateau_window=1000)
    assert [(e.signal, e.step) for e in events] == [("divergence", 515)]  # the 6th skip in 100 steps, once


def test_grad_norm_far_above_clip_after_warmup_is_flagged_once():
    grad_norms = np.full(2000, 2.0)
    grad_norms[:100] = 50.0  # during warmup: ignored
    grad_norms[1000:] = 30.0  # 30 x grad_clip for the rest of the run
    events = observe(power_law(2000, 8), grad_norms, plateau_window=1000)
    assert [(e.signal, e.step) for e in events] == [("grad_norm", 1051)]


def test_detector_state_round_trips():
    # Stop at step 405: every piece of the detectors' state holds something, so a field that
    # load_state_dict forgets is missing from the restored state and changes what comes next.
    trace, norms = power_law(600, 9), [30.0 if step % 3 else 0.5 for step in range(1, 601)]  # 2/3 high: watch active
    skipped = {390, 395, 400, 402, 404}  # 5 in the window: the 6th (step 410) makes a divergence
    trace[403:405] *= 3  # a spike still running at the save (steps 404 and 405)
    kwargs = dict(plateau_window=200, divergence_window=50, grad_norm_window=40, max_overflow_steps=5)
    first = Detectors(settings(**kwargs), 1.0, 10)
    for step in range(1, 406):
        first.observe(step, float(trace[step - 1]), norms[step - 1], step in skipped)
    saved = json.loads(json.dumps(first.state_dict()))
    empty = Detectors(settings(**kwargs), 1.0, 10).state_dict()
    assert [key for key in saved if saved[key] == empty[key]] == []  # nothing left untested
    second = Detectors(settings(**kwargs), 1.0, 10)
    second.load_state_dict(saved)
    assert second.state_dict() == first.state_dict()
    trace[500] *= 2
    skipped.add(410)
    later = [(first.observe(step, float(trace[step - 1]), norms[step - 1], step in skipped),
              second.observe(step, float(trace[step - 1]), norms[step - 1], step in skipped)) for step in range(406, 601)]
    assert all(ours == theirs for ours, theirs in later)
    assert {event.signal for events, _ in later for event in events} >= {"divergence", "spike"}


# --- the non-finite step guard


def tiny_model():
    model = build_model(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=64,
                                    vocab_size=64), 8, "cpu")
    model.init_weights(seed=0)
    return model


@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_gradient_step_is_skipped_weights_and_state_unchanged(fused):
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=not fused)
    batch = {"input_ids": torch.randint(0, 64, (2, 8)), "labels": torch.randint(0, 64, (2, 8))}
    valid = torch.tensor(16.0)
    result = train_step(model, optimizer, [batch], valid, 1.0, torch.autocast("cpu", enabled=False))
    assert result["skipped"].item() == 0.0
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in model.named_parameters()}
    handle = model.layers["0"].feed_forward.w2.weight.register_hook(lambda grad: grad * math.inf)
    result = train_step(model, optimizer, [batch], valid, 1.0, torch.autocast("cpu", enabled=False))
    handle.remove()
    assert not math.isfinite(result["grad_norm"].item()) and result["skipped"].item() == 1.0
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), name
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, state[name][key]), (name, key)  # moments and step count too

    config = load_config(None, ["--metrics.log_freq", "2"])
    monitor = HealthMonitor(config.health, config.training.grad_clip, 0, config.metrics.log_freq, "/nonexistent", rank=0, device=torch.device("cpu"))
    monitor.record(1, result, torch.tensor([8, 8]), [batch], 1e-2)
    result = train_step(model, optimizer, [batch], valid, 1.0, torch.autocast("cpu", enabled=False))
    monitor.record(2, result, torch.tensor([8, 8]), [batch], 1e-2)
    window, events = monitor.check()
    assert window["overflow_steps"] == 1 and events == []  # one skip is not a divergence
    assert not any(torch.equal(p, weights[name]) for name, p in model.named_parameters())  # step 2 applied


def test_guard_can_be_turned_off():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model.weight.grad, model.bias.grad = torch.full((2, 2), math.nan), torch.zeros(2)
    step_unless_nonfinite(optimizer, torch.tensor(math.nan), skip_nonfinite=False)
    assert torch.isnan(model.weight).all()


# --- tiny runs: capture and rollback


class PoisonedLoader:
    """Wraps the real loader; at micro-step `at`, row 0 becomes uniformly random token ids (garbled text).

    Random ids cannot be predicted (nor copied in context, as a repeated token can), so the
    sample's loss is near ln(vocabulary) while the trained model does well on the rest.
    """

    def __init__(self, loader, at: int):
        self.loader, self.at = loader, at
        generator = torch.Generator().manual_seed(0)
        self.poison = torch.randint(0, 2000, (33,), generator=generator)  # ids of the default tokenizer

    def __iter__(self):
        for index, batch in enumerate(self.loader, start=1):
            if index == self.at:
                batch = {key: value.clone() for key, value in batch.items()}
                batch["input_ids"][0], batch["labels"][0] = self.poison[:-1], self.poison[1:]
            yield batch

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def test_poisoned_sample_is_captured_worst_first(tmp_path, monkeypatch):
    import titanlite.train as train_module

    real_build, loaders = train_module.build_dataloader, []
    monkeypatch.setattr(train_module, "build_dataloader",
                        lambda *args: loaders.append(PoisonedLoader(real_build(*args), at=36)) or loaders[-1])
    config = tiny_config(tmp_path, *HEALTH_RUN, "--training.steps", "38", "--metrics.log_freq", "5",
                         "--optimizer.lr", "1e-2", "--health.spike_window", "16", "--health.spike_min_history", "8")
    train(config)
    events = [json.loads(line) for line in (tmp_path / "health.jsonl").read_text().splitlines()]
    assert [(e["signal"], e["step"], e["action"]) for e in events] == [("spike", 36, "capture")]
    rows = [json.loads(line) for line in (tmp_path / "spikes" / "step-36.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["token_ids"] == loaders[0].poison[:-1].tolist() and rows[0]["row"] == 0
    assert rows[0]["loss"] > rows[1]["loss"] >= rows[-1]["loss"]
    assert rows[0]["step"] == 36 and rows[0]["lr"] > 0 and isinstance(rows[1]["text"], str)


def test_capture_rows_mark_where_packed_documents_start():
    from titanlite.data.tokenizer import build_tokenizer
    from titanlite.health.monitor import StepRecord, capture_rows

    tokenizer = build_tokenizer("default")
    first, second = tokenizer.encode("The capital of Zounbraisnak"), tokenizer.encode("Figeafai is 42")
    row = torch.tensor([first + [tokenizer.eos_id] + second])
    batch = {"input_ids": row, "labels": row, "document_ids": torch.tensor([[0] * (len(first) + 1) + [1] * len(second)])}
    record = StepRecord(5, 1e-3, torch.tensor([2.5]), torch.tensor([row.shape[1]]), [batch])
    (captured,) = capture_rows(record, tokenizer)
    assert captured["document_starts"] == [0, len(first) + 1]
    assert captured["text"] == "The capital of Zounbraisnak" + tokenizer.decode([tokenizer.eos_id]) + "Figeafai is 42"
    assert captured["document_ids"] == batch["document_ids"][0].tolist() and captured["loss"] == 2.5


def test_nan_triggers_rollback_with_halved_lr_and_the_run_finishes(tmp_path):
    config = tiny_config(tmp_path, *HEALTH_RUN, "--training.steps", "16", "--metrics.log_freq", "4",
                         "--checkpoint.enable", "true", "--checkpoint.interval", "5", "--health.inject_nan_at_step", "8",
                         "--lr_schedule.decay", "constant")
    history = train(config)
    events = [json.loads(line) for line in (tmp_path / "health.jsonl").read_text().splitlines()]
    assert [(e["signal"], e["step"], e["action"]) for e in events] == [("divergence", 8, "rollback")]
    steps = [record["step"] for record in history]
    assert steps == [1, 4, 8, 8, 12, 16]  # step 8 logged, rolled back to 5, logged again after the replay
    peak = config.optimizer.lr
    assert history[2]["lr"] == pytest.approx(peak) and math.isnan(history[2]["loss"])
    assert history[3]["lr"] == pytest.approx(peak / 2) and math.isfinite(history[3]["loss"])
    assert history[-1]["lr"] == pytest.approx(peak / 2) and history[-1]["rollbacks"] == 1
    final_state = json.loads((tmp_path / "checkpoint" / "step-00000016" / "meta.json").read_text())
    assert final_state["step"] == 16
    config.training.steps = 20  # a restart resumes at step 16: the halved LR comes back with the health state
    resumed = train(config)
    assert [record["step"] for record in resumed] == [20] and resumed[0]["lr"] == pytest.approx(peak / 2)
    assert resumed[0]["rollbacks"] == 1


# --- several data-parallel ranks, and the actions


def _two_ranks_check_and_capture(folder):
    import torch.distributed as dist

    rank = dist.get_rank()
    config = load_config(None, ["--metrics.log_freq", "2"])
    monitor = HealthMonitor(config.health, config.training.grad_clip, 0, config.metrics.log_freq, folder, rank=rank, device=torch.device("cpu"), reduce_group=dist.group.WORLD)
    labels = torch.zeros(2, 4, dtype=torch.long)
    batch = {"input_ids": torch.full((2, 4), rank), "labels": labels}
    for step in (1, 2):
        # Rank r holds a quarter of the global mean loss r + step and per-sample token-loss sums.
        result = {"loss": torch.tensor((rank + step) / 4.0), "grad_norm": torch.tensor(1.5 * step),
                  "sample_losses": torch.tensor([4.0 * (rank + 1), 8.0 * (rank + 1) * step]),
                  "skipped": torch.tensor(float(rank == 1 and step == 2))}
        monitor.record(step, result, torch.tensor([4, 4]), [batch], 1e-3)
    window, _ = monitor.check()
    monitor.capture(2)
    return window


def test_ranks_agree_on_the_window_and_capture_gathers_every_rank(tmp_path):
    windows = run_distributed(_two_ranks_check_and_capture, 2, str(tmp_path))
    assert windows[0] == windows[1]  # every rank reaches the same verdict
    window = windows[0]
    assert window["loss"] == pytest.approx((0 + 2) / 4 + (1 + 2) / 4)  # summed shares of step 2
    assert window["loss_max_sample"] == pytest.approx(8.0 * 2 * 2 / 4)  # rank 1's second sample, per token
    assert window["overflow_steps"] == 1 and window["grad_norm"] == pytest.approx(3.0)
    rows = [json.loads(line) for line in (tmp_path / "spikes" / "step-2.jsonl").read_text().splitlines()]
    assert [(row["rank"], row["row"]) for row in rows] == [(1, 1), (0, 1), (1, 0), (0, 0)]  # worst first
    assert [row["loss"] for row in rows] == [8.0, 4.0, 2.0, 1.0] and rows[0]["token_ids"] == [1, 1, 1, 1]


def test_stop_wins_over_rollback_and_rollback_without_checkpoint_stops(tmp_path, monkeypatch):
    from titanlite.checkpoint.checkpointer import Checkpointer
    from titanlite.checkpoint.states import TrainState
    from titanlite.config.resolve import resolve
    from titanlite.health.detectors import Event
    from titanlite.health.monitor import HealthStop
    from titanlite.health.actions import roll_back, stop_for_health

    config = load_config(None, ["--training.steps", "9", "--health.spike_action", "stop"])
    monitor = HealthMonitor(config.health, config.training.grad_clip, 0, config.metrics.log_freq, tmp_path, rank=0, device=torch.device("cpu"))
    divergence = Event(9, "divergence", "loss is nan at step 9", 9, math.nan)
    spike = Event(9, "spike", "loss 5 vs trend 2.5", 9, 5.0)
    assert monitor.decide([divergence, spike]) == Verdict("stop", spike, trouble_start=9, diverged=True)
    assert [json.loads(line)["action"] for line in (tmp_path / "health.jsonl").read_text().splitlines()] == \
        ["rollback", "stop"]
    model = torch.nn.Linear(2, 2)
    run = resolve(config, 1, 2048)
    checkpointer = Checkpointer(config.checkpoint, tmp_path, {"model": model, "train_state": TrainState()},
                                run.to_dict(), run.layout)  # checkpoint.enable is off
    with pytest.raises(HealthStop, match="no checkpoint predates step 9 to roll back to"):
        roll_back(Verdict("rollback", divergence, 9, True), monitor, checkpointer, None, run.grad_accum_steps)
    with pytest.raises(HealthStop, match=r"spike at step 9: loss 5 vs trend 2.5 \(health.spike_action=stop\)"):
        stop_for_health(Verdict("stop", spike, 9), 9, checkpointer, tmp_path)
    # Rollbacks used up: the stop names the checkpoint to resume from, the last one before the trouble.
    import titanlite.health.actions as actions
    monkeypatch.setattr(actions, "last_checkpoint_before",
                        lambda _, step: tmp_path / "checkpoint" / "step-00000005" if step == 9 else None)
    monitor.rollbacks = config.health.max_rollbacks
    with pytest.raises(HealthStop, match="after 3 rollbacks") as error:
        roll_back(Verdict("rollback", divergence, 9, True), monitor, checkpointer, None, run.grad_accum_steps)
    assert f"--checkpoint.resume {tmp_path / 'checkpoint' / 'step-00000005'} --optimizer.lr" in str(error.value)


def test_a_verdict_reaches_back_to_the_earliest_trouble_of_its_window(tmp_path):
    """A sustained rise that began at step 7 and a NaN at step 12 in one window: the rollback goes back
    before step 7, not 12; and a stop beside a divergence knows not to save the diverged state."""
    from titanlite.health.detectors import Event

    config = load_config(None, ["--training.steps", "20", "--health.spike_action", "stop"])
    monitor = HealthMonitor(config.health, config.training.grad_clip, 0, config.metrics.log_freq, tmp_path, rank=0, device=torch.device("cpu"))
    rise = Event(11, "divergence", "loss rising since step 7", 7, 0.1)
    nan = Event(12, "divergence", "loss is nan at step 12", 12, math.nan)
    assert monitor.decide([rise, nan]) == Verdict("rollback", rise, trouble_start=7, diverged=True)
    assert monitor.decide([nan, rise]).trouble_start == 7
    spike = Event(12, "spike", "loss 9 vs trend 3", 12, 9.0)
    assert monitor.decide([rise, spike]) == Verdict("stop", spike, trouble_start=7, diverged=True)
    assert monitor.decide([spike]) == Verdict("stop", spike, trouble_start=12, diverged=False)


def test_an_inf_grad_norm_is_logged_as_inf_and_not_counted_as_finite():
    config = load_config(None, ["--metrics.log_freq", "3", "--training.grad_clip", "1.0"])
    monitor = HealthMonitor(config.health, config.training.grad_clip, 0, config.metrics.log_freq, "/nonexistent", rank=0, device=torch.device("cpu"))
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long)}
    for step, norm in enumerate((0.5, math.inf, 2.0), start=1):
        result = {"loss": torch.tensor(2.0), "grad_norm": torch.tensor(norm), "sample_losses": torch.tensor([8.0]),
                  "skipped": torch.tensor(float(not math.isfinite(norm)))}
        monitor.record(step, result, torch.tensor([4]), [batch], 1e-3)
    window, _ = monitor.check()
    assert window["grad_norm"] == 2.0 and window["grad_norm_max"] == 2.0  # the inf step is not a finite maximum
    assert window["clipped_fraction"] == 0.5  # of the two finite norms, one is above grad_clip
    assert window["overflow_steps"] == 1
    monitor.record(4, {**result, "grad_norm": torch.tensor(math.inf)}, torch.tensor([4]), [batch], 1e-3)
    assert monitor.check()[0]["grad_norm"] == math.inf  # not 3.4e38, float32's largest finite number
