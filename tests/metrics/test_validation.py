"""Validation loss: held-out rows disjoint from training, the loss against a plain computation, layouts agree."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from distributed import run_distributed

from titanlite.config.resolve import resolve
from titanlite.data.corpus import DEFAULT_CORPUS_SEED, generate_documents
from titanlite.data.documents import DataError
from titanlite.data.tokenizer import build_tokenizer
from titanlite.metrics.validation import Validator, held_out_rows
from titanlite.model.loss import IGNORE_INDEX
from titanlite.model.transformer import build_model

VALIDATION = ["--validation.enable", "true", "--validation.steps", "3", "--validation.interval", "4"]


def documents_in(rows, eos_id: int) -> list[tuple[int, ...]]:
    """The whole documents inside packed rows (between two EOS of one row)."""
    found = []
    for row in rows.tolist():
        ends = [i for i, token in enumerate(row) if token == eos_id]
        found += [tuple(row[a + 1:b + 1]) for a, b in zip(ends, ends[1:])]
    return found


def test_held_out_rows_hold_no_training_document(tmp_path, monkeypatch):
    import titanlite.metrics.validation as validation

    config = tiny_config(tmp_path, "--data.default_num_documents", "300", "--training.seq_len", "1024")
    tokenizer = build_tokenizer("default")
    training = generate_documents(300, seed=DEFAULT_CORPUS_SEED)
    # A generator that repeats training documents after them: every repeat must be left out.
    monkeypatch.setattr(validation, "generate_documents",
                        lambda count, seed: (training + training[:40] + generate_documents(count, seed)[300:])[:count])
    rows = held_out_rows(300, tokenizer, config.training.seq_len, 40)
    assert rows.rows.shape == (40, 1025)
    trained = {tuple(tokenizer.encode(text) + [tokenizer.eos_id]) for text in training}
    held_out = documents_in(rows.rows, tokenizer.eos_id)
    assert len(held_out) > 20 and not trained & set(held_out)


def plain_held_out_rows(trained: int, tokenizer, row_length: int, count: int) -> torch.Tensor:
    """The reference rows, written out: the generated documents after the training ones, minus any
    text that is also a training document, each + EOS, concatenated, cut into rows."""
    texts = generate_documents(trained + 400, seed=DEFAULT_CORPUS_SEED)
    training = set(texts[:trained])
    stream = [token for text in texts[trained:] if text not in training
              for token in tokenizer.encode(text) + [tokenizer.eos_id]]
    assert len(stream) >= count * row_length
    return torch.tensor(stream[:count * row_length]).view(count, row_length)


def validator_for(config, tokenizer, dp_rank=0, dp_degree=1):
    """The Validator train.py builds for `config` (one process unless dp_degree says otherwise)."""
    from titanlite.data.loader import batch_maker
    from titanlite.metrics.validation import build_validation_rows

    run = resolve(config, dp_degree, tokenizer.vocab_size)
    settings, seq_len = config.validation, config.training.seq_len
    rows = build_validation_rows(settings, config.data, tokenizer, seq_len,
                                 settings.steps * run.tokens_per_step // seq_len, tmp_cache(config))
    to_batch = batch_maker(tokenizer.eos_id, config.data.loss_across_documents, run.document_ids,
                           run.document_positions)
    return run, Validator(settings, rows, settings.steps * run.grad_accum_steps, config.training.micro_batch_size,
                          run.total_steps, dp_rank, dp_degree, to_batch)


def tmp_cache(config):
    from pathlib import Path

    return Path(config.job.dump_folder) / "datasets_cache"


def test_validation_loss_equals_a_plain_computation(tmp_path):
    from titanlite.model.loss import cross_entropy_per_sample

    config = tiny_config(tmp_path, *VALIDATION)
    tokenizer = build_tokenizer("default")
    run, validator = validator_for(config, tokenizer)
    model = build_model(run.config.model, 32, "cpu")
    model.init_weights(seed=0)
    result = validator.evaluate(model, torch.device("cpu"), torch.autocast("cpu", enabled=False),
                                cross_entropy_per_sample, torch.no_grad)
    # Reference: every held-out row of 3 global batches of 256 tokens (24 rows), in float64, in one go.
    rows = plain_held_out_rows(300, tokenizer, 33, 24)
    inputs, labels = rows[:, :-1], rows[:, 1:].clone()
    labels[inputs == tokenizer.eos_id] = IGNORE_INDEX
    with torch.no_grad():
        logits = model.double()(inputs)
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert result["val_tokens"] == int((labels != IGNORE_INDEX).sum())
    assert result["val_loss"] == pytest.approx(reference.item(), rel=1e-6)
    assert result["val_perplexity"] == pytest.approx(math.exp(reference.item()), rel=1e-6)


def test_validation_of_the_training_data_is_refused(tmp_path):
    tokenizer = build_tokenizer("default")
    same = tiny_config(tmp_path, *VALIDATION, "--validation.source", str(tmp_path / "data"),
                       "--data.source", str(tmp_path / "data"))
    with pytest.raises(DataError, match="is the training data"):
        validator_for(same, tokenizer)
    generated = tiny_config(tmp_path, *VALIDATION, "--data.source", str(tmp_path / "data"))
    with pytest.raises(DataError, match="validation.source=default holds out part of the generated corpus"):
        validator_for(generated, tokenizer)
    missing = tiny_config(tmp_path, *VALIDATION, "--validation.source", str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"^validation.source=.*missing"):  # not data.source, which is fine
        validator_for(missing, tokenizer)


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
