"""Validation loss: held-out rows disjoint from training, the loss against a plain computation, layouts agree."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from distributed import run_distributed
from titanlite.resolve import resolve
from titanlite.corpus import DEFAULT_CORPUS_SEED, generate_documents
from titanlite.data import DataError
from titanlite.loss import IGNORE_INDEX
from titanlite.model import build_model
from titanlite.tokenizer import build_tokenizer
from titanlite.validation import Validator, held_out_rows

VALIDATION = ["--validation.enable", "true", "--validation.steps", "3", "--validation.interval", "4"]


def documents_in(rows, eos_id: int) -> list[tuple[int, ...]]:
    """The whole documents inside packed rows (between two EOS of one row)."""
    found = []
    for row in rows.tolist():
        ends = [i for i, token in enumerate(row) if token == eos_id]
        found += [tuple(row[a + 1:b + 1]) for a, b in zip(ends, ends[1:])]
    return found


def test_held_out_rows_hold_no_training_document(tmp_path, monkeypatch):
    import titanlite.validation as validation

    config = tiny_config(tmp_path, "--data.default_num_documents", "300", "--training.seq_len", "1024")
    tokenizer = build_tokenizer("default")
    training = generate_documents(300, seed=DEFAULT_CORPUS_SEED)
    # A generator that repeats training documents after them: every repeat must be left out.
    monkeypatch.setattr(validation, "generate_documents",
                        lambda count, seed: (training + training[:40] + generate_documents(count, seed)[300:])[:count])
    rows = held_out_rows(config, tokenizer, 40)
    assert rows.rows.shape == (40, 1025)
    trained = {tuple(tokenizer.encode(text) + [tokenizer.eos_id]) for text in training}
    held_out = documents_in(rows.rows, tokenizer.eos_id)
    assert len(held_out) > 20 and not trained & set(held_out)


def test_validation_loss_equals_a_plain_computation(tmp_path):
    config = tiny_config(tmp_path, *VALIDATION)
    tokenizer = build_tokenizer("default")
    run = resolve(config, 1, tokenizer.vocab_size)
    validator = Validator(run, tokenizer, dp_rank=0)
    model = build_model(run.config.model, 32, "cpu")
    model.init_weights(seed=0)
    result = validator.evaluate(model, torch.device("cpu"), torch.autocast("cpu", enabled=False),
                                lambda logits, labels: F.cross_entropy(
                                    logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                    reduction="none").view(labels.shape).sum(1),
                                torch.no_grad)
    # Reference: every held-out row of 3 global batches of 256 tokens (24 rows), in float64, in one go.
    rows = torch.from_numpy(held_out_rows(run.config, tokenizer, 24).rows).long()
    inputs, labels = rows[:, :-1], rows[:, 1:].clone()
    labels[inputs == tokenizer.eos_id] = IGNORE_INDEX
    with torch.no_grad():
        logits = model.double()(inputs)
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert result["val_tokens"] == int((labels != IGNORE_INDEX).sum())
    assert result["val_loss"] == pytest.approx(reference.item(), rel=1e-6)
    assert result["val_perplexity"] == pytest.approx(math.exp(reference.item()), rel=1e-6)


def test_validation_of_the_training_data_is_refused(tmp_path):
    from titanlite.validation import build_validation_rows

    tokenizer = build_tokenizer("default")
    same = tiny_config(tmp_path, *VALIDATION, "--validation.source", str(tmp_path / "data"),
                       "--data.source", str(tmp_path / "data"))
    with pytest.raises(DataError, match="is the training data"):
        build_validation_rows(resolve(same, 1, 2048), tokenizer)
    generated = tiny_config(tmp_path, *VALIDATION, "--data.source", str(tmp_path / "data"))
    with pytest.raises(DataError, match="validation.source=default holds out part of the generated corpus"):
        build_validation_rows(resolve(generated, 1, 2048), tokenizer)
    missing = tiny_config(tmp_path, *VALIDATION, "--validation.source", str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"^validation.source=.*missing"):  # not data.source, which is fine
        build_validation_rows(resolve(missing, 1, 2048), tokenizer)


def validation_history(folder: str, overrides: list[str]) -> list[tuple[int, float]]:
    from titanlite.train import train

    history = train(tiny_config(folder, *VALIDATION, "--training.steps", "8", "--metrics.log_freq", "4", *overrides))
    return [(record["step"], record["val_loss"]) for record in history if "val_loss" in record]


@pytest.mark.slow
def test_every_layout_evaluates_the_same_tokens(tmp_path):
    single = run_distributed(validation_history, 1, str(tmp_path / "one"), [], timeout=300)[0]
    fsdp = run_distributed(validation_history, 2, str(tmp_path / "two"), ["--training.micro_batch_size", "2"],
                           timeout=300)
    assert [step for step, _ in single] == [4, 8]  # every 4 steps and the last
    assert fsdp[0] == fsdp[1]
    for (step, ours), (_, theirs) in zip(fsdp[0], single):
        assert ours == pytest.approx(theirs, rel=1e-5), step
