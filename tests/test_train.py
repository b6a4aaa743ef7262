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
