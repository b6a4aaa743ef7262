"""Generation: the KV cache against full recomputation, FSDP checkpoints on one device, top-p, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from distributed import run_distributed

from titanlite.checkpoint.weights import save_model_checkpoint
from titanlite.config.settings import Model as ModelConfig
from titanlite.data.loader import make_batch
from titanlite.data.tokenizer import build_tokenizer
from titanlite.generate import choose_token, document_prompt, generate, load_model, main, nucleus_mask
from titanlite.model.attention import document_mask
from titanlite.model.kv_cache import KVCache
from titanlite.model.transformer import build_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [3, 17, 60, 41, 88, 5]


def random_model(seq_len=64, **overrides):
    # init_std 0.2 (not 0.02): sharper attention, so greedy text depends on the context and does not
    # settle into a two-token loop, which would let a cache with wrong positions pass.
    values = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=160, vocab_size=96, init_std=0.2)
    model = build_model(ModelConfig(**{**values, **overrides}), seq_len, device="cpu")
    model.init_weights(seed=0)
    return model.eval()


def greedy_by_recomputation(model, prompt, steps):
    """The reference: run the whole sequence again for every new token, no cache."""
    tokens, logits_seen = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([tokens]))[0, -1]
            logits_seen.append(logits)
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):], logits_seen


# YaRN changes the softmax scale, which the cached path must apply too.
MODELS = {"plain": {}, "yarn": dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_position=16)}


@pytest.mark.parametrize("variant", MODELS)
def test_cached_greedy_equals_recomputed_greedy(variant):
    model = random_model(**MODELS[variant])
    cached = [token for token, _ in generate(model, PROMPT, 50)]
    reference, _ = greedy_by_recomputation(model, PROMPT, 50)
    assert cached == reference
    assert len(set(cached)) > 10  # not a model stuck in a short loop


@pytest.mark.parametrize("variant", MODELS)
def test_cached_logits_match_the_uncached_forward_at_every_step(variant):
    model = random_model(**MODELS[variant])
    steps = list(generate(model, PROMPT, 30))
    _, reference_logits = greedy_by_recomputation(model, PROMPT, 30)
    assert len(steps) == 30
    for step, ((_, logits), reference) in enumerate(zip(steps, reference_logits)):
        torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5, msg=f"step {step}")


def test_a_document_masked_model_continues_a_prompt_as_training_saw_the_document():
    """The reference is the training forward: a packed row (another document, EOS, the prompt) under
    the document mask with per-document positions, read at the prompt's last token."""
    eos = 1
    model = random_model(attention="flex", positions="document")
    row = np.array([[7, 9, 11, 13, eos, *PROMPT, 2]], dtype=np.int32)
    batch = make_batch(row, eos, loss_across_documents=False, document_positions=True, document_ids=True)
    with torch.no_grad():
        trained = model(batch["input_ids"], positions=batch["positions"],
                        mask=document_mask(batch["document_ids"]))[0, -1]
    prompt = document_prompt(PROMPT, eos, {"attention": "flex", "positions": "document"})
    assert prompt == PROMPT  # no EOS before it: under the mask no document ever saw one
    (_, logits), = generate(model, prompt, 1)
    torch.testing.assert_close(logits, trained.float(), rtol=1e-5, atol=1e-5)
    assert document_prompt(PROMPT, eos, {"attention": "sdpa", "positions": "sequence"}) == [eos, *PROMPT]


def test_cache_takes_several_new_tokens_after_the_first_chunk():
    """Chunks of 5, 3, 1, 4 tokens (the masked path: new tokens see the cache and each other causally)."""
    model = random_model()
    tokens = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens)
        cache = KVCache(model.config, 2, 13, torch.float32, "cpu")
        chunks = []
        with cache.attached(model):
            for start, end in ((0, 5), (5, 8), (8, 9), (9, 13)):
                chunks.append(model(tokens[:, start:end], positions=cache.positions(end - start).expand(2, -1)))
                cache.advance(end - start)
    assert cache.length == 13
    torch.testing.assert_close(torch.cat(chunks, dim=1), reference, rtol=0, atol=1e-5)


def test_generation_stops_at_the_stop_token_and_skips_padded_ids():
    model = random_model()
    first = [token for token, _ in generate(model, PROMPT, 10)]
    stopped = [token for token, _ in generate(model, PROMPT, 10, stop_id=first[2])]
    assert stopped == first[:first.index(first[2]) + 1]
    # vocab_size: ids past the tokenizer's (embedding padding) are never chosen
    limited = [token for token, _ in generate(model, PROMPT, 20, temperature=2.0, vocab_size=10,
                                               generator=torch.Generator().manual_seed(0))]
    assert all(token < 10 for token in limited)


# --- top-p

def test_top_p_only_picks_tokens_of_the_hand_computed_nucleus():
    # Five head tokens (0.45, 0.18, 0.135, 0.09, 0.045) and 100 tail tokens of 0.001, at shuffled ids.
    probs = [0.45, 0.18, 0.135, 0.09, 0.045] + [0.001] * 100
    ids = torch.randperm(105, generator=torch.Generator().manual_seed(0)).tolist()  # rank r -> token id
    logits = torch.empty(105)
    logits[ids] = torch.tensor(probs, dtype=torch.float64).log().float()
    # Mass before each head token: 0, 0.45, 0.63, 0.765, 0.855. A token is in when that is < top_p.
    cases = {0.8: [0, 1, 2, 3], 0.6: [0, 1], 0.3: [0]}
    for top_p, ranks in cases.items():
        nucleus = {ids[rank] for rank in ranks}
        assert set(nucleus_mask(torch.softmax(logits, -1), top_p).nonzero().flatten().tolist()) == nucleus, top_p
        generator = torch.Generator().manual_seed(1234)
        picks = [choose_token(logits, 1.0, top_p, generator) for _ in range(3000)]
        assert set(picks) == nucleus, top_p  # never outside the nucleus; every member drawn
        mass = sum(probs[rank] for rank in ranks)
        for rank in ranks:  # drawn in proportion to the renormalized probabilities
            assert picks.count(ids[rank]) / len(picks) == pytest.approx(probs[rank] / mass, abs=0.03), (top_p, rank)


def test_top_p_one_keeps_every_token_and_temperature_zero_is_argmax():
    logits = torch.tensor([0.0, 3.0, -1.0, 2.9])
    assert nucleus_mask(torch.softmax(logits, -1), 1.0).all()
    assert choose_token(logits, 0.0, 0.1) == 1
    generator = torch.Generator().manual_seed(0)
    assert {choose_token(logits, 1.0, 1.0, generator) for _ in range(400)} == {0, 1, 2, 3}


# --- checkpoints of any layout

def _fsdp_checkpoint_then_greedy(folder: str, prompt: list[int], steps: int) -> list[int]:
    """Train 4 steps under FSDP on 2 ranks (saving step 4), load that checkpoint into a fresh FSDP model
    and generate greedily with the sharded model, recomputing the whole sequence each step."""
    from titanlite.checkpoint.checkpointer import Checkpointer
    from titanlite.checkpoint.states import TrainState
    from titanlite.config.resolve import resolve
    from titanlite.parallel.mesh import ParallelDims
    from titanlite.parallel.parallelize import parallelize
    from titanlite.train import train

    config = tiny_config(folder, "--training.steps", "4", "--checkpoint.enable", "true",
                         "--checkpoint.interval", "4")
    train(config)
    run = resolve(config, 2, config.model.vocab_size)
    dims = ParallelDims.build(run.layout, "cpu")
    model = build_model(run.config.model, run.config.training.seq_len, device="meta")
    config = run.config
    parallelize(model, dims, config.parallelism, config.activation_checkpoint, False, config.float8, torch.float32)
    model.to_empty(device="cpu")
    model.init_rope()
    Checkpointer(config.checkpoint, Path(folder), {"model": model, "train_state": TrainState()}, run.to_dict(),
                 run.layout).load(
        Path(folder) / "checkpoint" / "step-00000004")
    generated, _ = greedy_by_recomputation(model, prompt, steps)
    return generated


@pytest.mark.slow
def test_fsdp_checkpoint_generates_on_one_device_as_the_sharded_model_does(tmp_path):
    sharded = run_distributed(_fsdp_checkpoint_then_greedy, 2, str(tmp_path), PROMPT, 20, timeout=240)
    assert sharded[0] == sharded[1]
    checkpoint = tmp_path / "checkpoint" / "step-00000004"
    model, meta = load_model(checkpoint)
    assert meta["layout"]["world_size"] == 2 and meta["layout"]["data_parallel_shard"] == 2
    assert [token for token, _ in generate(model, PROMPT, 20)] == sharded[0]


@pytest.fixture
def checkpoint(tmp_path):
    """A model-only checkpoint of the tiny model with the default tokenizer's 2,048 ids."""
    config = tiny_config(tmp_path)
    model = build_model(config.model, config.training.seq_len, device="cpu")
    model.init_weights(seed=0)
    return save_model_checkpoint(model.state_dict(), tmp_path / "ckpt", 7, config)


def test_load_model_in_bfloat16_keeps_rope_in_float32(checkpoint):
    model, meta = load_model(checkpoint, dtype=torch.bfloat16)
    assert meta["step"] == 7 and model.max_seq_len == 32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32
    assert len(list(generate(model, PROMPT, 5))) == 5


# --- command line

def test_cli_prints_the_completion_and_its_ids(checkpoint):
    """40 new tokens past a 32-token training context: a warning, and RoPE tables long enough."""
    result = subprocess.run([sys.executable, "-m", "titanlite.generate", str(checkpoint), "--prompt",
                             "The river", "--max-new-tokens", "40", "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "past the 32 the model was trained on" in result.stderr
    output = json.loads(result.stdout)
    tokenizer = build_tokenizer("default")
    assert output["prompt_ids"] == [tokenizer.eos_id, *tokenizer.encode("The river")]
    model, _ = load_model(checkpoint, max_seq_len=len(output["prompt_ids"]) + 40)
    expected = [token for token, _ in generate(model, output["prompt_ids"], 40, stop_id=tokenizer.eos_id,
                                               vocab_size=tokenizer.vocab_size)]
    assert output["completion_ids"] == [token for token in expected if token != tokenizer.eos_id]
    assert output["completion"] == tokenizer.decode(output["completion_ids"])
    assert output["stop_reason"] == ("eos" if expected[-1] == tokenizer.eos_id else "max_new_tokens")


@pytest.mark.parametrize("arguments, culprit", [
    (["--prompt", ""], "--prompt"),
    (["--prompt", "hi", "--temperature", "-0.5"], "--temperature"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["--prompt", "hi", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", "hi", "--temperature", "warm"], "--temperature"),
    (["--prompt", "hi", "--temperature", "nan"], "--temperature nan: must be a finite number >= 0"),
    (["--prompt", "hi", "--temperature", "inf"], "--temperature inf: must be a finite number >= 0"),
    (["--prompt", "hi", "--temperature", "1", "--top-p", "nan"], "--top-p nan: must be in (0, 1]"),
    (["--prompt", "hi", "--temperature", "1", "--top-p", "inf"], "--top-p inf: must be in (0, 1]"),
])
def test_cli_bad_arguments_exit_2_with_one_line(checkpoint, capsys, arguments, culprit):
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), *arguments])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and culprit in captured.err


def test_cli_bad_checkpoints_exit_2_with_one_line(tmp_path, checkpoint, capsys):
    for path, words in ((tmp_path / "nowhere", "does not exist"),
                        (checkpoint.parent, "folder of checkpoints"),
                        (tmp_path, "has no meta.json")):
        with pytest.raises(SystemExit) as exit_info:
            main([str(path), "--prompt", "hi"])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert len(error.strip().splitlines()) == 1 and words in error and str(path) in error, error
    # a real process: the exit status and one line on stderr
    result = subprocess.run([sys.executable, "-m", "titanlite.generate", str(tmp_path / "nowhere"), "--prompt", "hi"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_loads_a_checkpoint_without_checksums_only_with_load_unverified(checkpoint, capsys):
    meta = json.loads((checkpoint / "meta.json").read_text())
    del meta["crc32"]
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), "--prompt", "hi", "--max-new-tokens", "2"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(error.strip().splitlines()) == 1 and "--load-unverified" in error
    main([str(checkpoint), "--prompt", "hi", "--max-new-tokens", "2", "--load-unverified", "--json"])
    assert len(json.loads(capsys.readouterr().out)["completion_ids"]) <= 2
