"""The training step and the debug run."""

import copy

import pytest
import torch
import torch.nn.functional as F

from titanlite.config.load import load_config
from titanlite.config.settings import Model as ModelConfig
from titanlite.model.loss import IGNORE_INDEX
from titanlite.model.transformer import build_model
from titanlite.train import train, train_step


class GradientRecorder(torch.optim.SGD):
    """An optimizer that records the (clipped) gradients it is asked to apply."""

    def __init__(self, model):
        super().__init__(model.parameters(), lr=0.0)
        self.names = {p: n for n, p in model.named_parameters()}
        self.grads = {}

    def step(self, closure=None):
        self.grads = {self.names[p]: p.grad.clone() for p in self.names}


def test_accumulated_micro_batches_equal_one_large_batch():
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=160,
                                    vocab_size=96), 16, "cpu")
    model.init_weights(seed=0)
    reference = copy.deepcopy(model)
    tokens = torch.randint(0, 96, (8, 16))
    labels = torch.randint(0, 96, (8, 16))
    labels[1, 3:] = IGNORE_INDEX  # unequal valid-token counts per micro-batch: naive averaging would be wrong
    labels[6, :12] = IGNORE_INDEX

    # Reference: one batch of 8, mean over the valid tokens, plain autograd (clipped by hand below).
    loss = F.cross_entropy(reference(tokens).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    reference_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in reference.parameters()))

    micro_batches = [{"input_ids": tokens[i:i + 2], "labels": labels[i:i + 2]} for i in range(0, 8, 2)]
    valid_tokens = (labels != IGNORE_INDEX).sum().float()
    optimizer = GradientRecorder(model)
    result = train_step(model, optimizer, micro_batches, valid_tokens,
                        grad_clip=0.0, autocast=torch.autocast("cpu", enabled=False))
    torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(result["grad_norm"].double(), reference_norm, rtol=1e-5, atol=0)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(optimizer.grads[name], p.grad, rtol=1e-5, atol=1e-8)
    assert result["sample_losses"].shape == (8,)

    # Clipping: with max norm = half the true norm, every gradient is scaled by exactly 1/2
    # (torch's coefficient max_norm / (norm + 1e-6) is 0.5 to ~1e-6 relative at this norm).
    max_norm = 0.5 * reference_norm.item()
    assert max_norm > 1e-3  # far above the 1e-6 in the coefficient
    result = train_step(model, optimizer, micro_batches, valid_tokens,
                        grad_clip=max_norm, autocast=torch.autocast("cpu", enabled=False))
    torch.testing.assert_close(result["grad_norm"].double(), reference_norm, rtol=1e-5, atol=0)  # before clipping
    for name, p in reference.named_parameters():
        torch.testing.assert_close(optimizer.grads[name], p.grad * 0.5, rtol=1e-5, atol=1e-8)
    clipped_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in optimizer.grads.values()))
    torch.testing.assert_close(clipped_norm, torch.tensor(max_norm, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_debug_run_loss_falls(tmp_path):
    """README promise: the debug model's loss falls from ~7.7 to below 2.5 within 40 steps."""
    config = load_config("debug_model", ["--training.steps", "40", "--job.dump_folder", str(tmp_path),
                                         "--metrics.log_freq", "10", "--metrics.enable_tensorboard", "false"])
    records = train(config)
    assert records[0]["step"] == 1 and records[-1]["step"] == 40
    assert records[0]["loss"] > 7.0  # ln(2048) = 7.6: the untrained model is uniform over the vocabulary
    assert records[-1]["loss"] < 2.5
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == len(records)


# --- what is checked before any work

def test_start_up_says_what_will_happen_and_warns_of_a_warmup_longer_than_the_run(tiny, capfd):
    train(tiny("--training.steps", "4", "--lr_schedule.warmup_tokens", "2048", "--lr_schedule.decay", "constant",
               "--validation.enable", "true", "--validation.steps", "1", "--validation.interval", "2"))
    text = "".join(capfd.readouterr())
    # 300 documents packed into rows of 33 tokens; 4 steps x 256 tokens over those rows' 32-token sequences.
    rows = int(text.split("data: default:300: ")[1].split(" rows")[0].replace(",", ""))
    assert f"{rows * 32:,} tokens); the run reads 1,024 tokens = {1024 / (rows * 32):.2f} epochs" in text
    assert "layout: one replica on 1 cpu process, float32" in text
    assert "steps: 4 of 256 tokens (2 x micro-batch 4 per rank), warm-up 8 steps to lr 0.003, constant decay" in text
    assert "validation: " in text and "1 batches every 2 steps" in text
    # Linear warm-up over 8 steps ends the 4-step run at 4/8 of the peak.
    assert ("lr_schedule.warmup_tokens=2,048 is 8 steps, longer than the run's 4: the LR ends at 50% of optimizer.lr "
            "without reaching it") in text


def test_a_checkpoint_past_the_end_is_refused_and_a_finished_run_trains_nothing(tiny, tmp_path):
    from titanlite.config.settings import ConfigError
    train(tiny("--training.steps", "4", "--checkpoint.enable", "true", "--checkpoint.interval", "2"))
    with pytest.raises(ConfigError, match=r"the checkpoint resumed is at step 4, past this run's 3 steps"):
        train(tiny("--training.steps", "3", "--checkpoint.enable", "true"))
    logged = (tmp_path / "metrics.jsonl").read_text()
    assert train(tiny("--training.steps", "4", "--checkpoint.enable", "true")) == []
    assert (tmp_path / "metrics.jsonl").read_text() == logged


def test_an_unfinished_later_checkpoint_is_refused_before_training(tiny, tmp_path):
    from titanlite.checkpoint.storage import CheckpointError
    train(tiny("--training.steps", "4", "--checkpoint.enable", "true", "--checkpoint.interval", "2"))
    (tmp_path / "checkpoint" / "step-00000004" / "meta.json").unlink()  # a copy that did not finish, say
    logged = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=r"step-00000004 exists but is not a complete checkpoint .* this run "
                                              r"would stop at its save of step 4"):
        train(tiny("--training.steps", "4", "--checkpoint.enable", "true",
                   "--checkpoint.resume", str(tmp_path / "checkpoint" / "step-00000002")))
    assert (tmp_path / "metrics.jsonl").read_text() == logged  # refused before step 3


def test_a_model_too_large_for_the_host_is_refused_before_allocating(tiny):
    from titanlite.metrics.profiling import OutOfMemory
    # 400 blocks of width 8192: ~1.1e12 bytes of fp32 parameters alone, more than any CI host has.
    with pytest.raises(OutOfMemory, match=r"will not fit: the estimated peak is [\d,.]+ GiB per process and the host "
                                          r"\(shared by 1 processes\) has [\d.]+ GiB available; `python -m titanlite.plan"):
        train(tiny("--model.dim", "8192", "--model.n_layers", "400", "--model.n_heads", "64", "--model.n_kv_heads", "8",
                   "--model.intermediate_size", "28672"))


def test_a_global_batch_of_more_micro_batches_than_host_memory_holds_is_refused():
    from titanlite.config.resolve import resolve
    from titanlite.config.settings import ConfigError
    config = load_config("debug_model", ["--training.global_batch_tokens", str(10 ** 18)])
    with pytest.raises(ConfigError, match=r"training.global_batch_tokens=1,000,000,000,000,000,000 is "
                                          r"488,281,250,000,000 micro-batches per rank per step \(at most 65,536"):
        resolve(config, 1, 2008)
