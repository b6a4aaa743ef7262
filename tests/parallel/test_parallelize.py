"""Parallel layouts compute the same training run: 10 steps of a tiny model on CPU / gloo.

Every layout (FSDP2, TP, FSDP2 x TP, HSDP) and every activation-checkpointing mode must give the
single-process losses and grad norms. The batches carry ignored labels (a deterministic function
of the token), so micro-batches and ranks hold different numbers of valid tokens: a loss that
averaged per micro-batch or per rank instead of over the global batch would drift apart.

Tolerances: losses 1e-5 relative (float32). Grad norms 3e-5: the single-process reference sums
the squares of the 131k-element output-head gradient in float32 on CPU, which is itself off by
~1.2e-5 from float64 (measured), while sharded layouts reduce smaller pieces more accurately.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_config
from distributed import run_distributed

from titanlite.config.load import load_config
from titanlite.config.resolve import Layout
from titanlite.config.settings import ConfigError
from titanlite.parallel.memory import INIT_TEMPORARIES

TINY = ["--training.micro_batch_size", "2", "--training.steps", "10", "--training.grad_clip", "0.5",
        "--optimizer.lr", "3e-3", "--lr_schedule.warmup_tokens", "512", "--metrics.enable_jsonl", "false"]
AC_MODES = {
    "none": [],
    "full": ["--activation_checkpoint.mode", "full"],
    "op": ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_blocks", "0"],
    "layer2": ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_blocks", "2"],
}
LAYOUTS = {  # name: (world size, overrides)
    "fsdp2": (2, []),
    "tp2": (2, ["--parallelism.tensor_parallel_degree", "2"]),
    "fsdp2_tp2": (4, ["--parallelism.tensor_parallel_degree", "2"]),
    "hsdp2x2": (4, ["--parallelism.data_parallel_replicate_degree", "2"]),
}
LOSS_RTOL, GRAD_NORM_RTOL = 1e-5, 3e-5


def ignore_some_labels(loader):
    """Mark labels whose token id is divisible by 3 as ignored: same rows, uneven valid counts."""
    from titanlite.model.loss import IGNORE_INDEX

    for batch in loader:
        labels = batch["labels"].clone()
        labels[labels % 3 == 0] = IGNORE_INDEX
        yield {**batch, "labels": labels}


def train_runs(folder: str, runs: list[tuple[str, list[str]]]) -> dict[str, dict]:
    """Train each run in this process group; {name: {"loss": [...], "grad_norm": [...], ...}}."""
    import titanlite.train as train_module

    build = train_module.build_dataloader
    train_module.build_dataloader = lambda *args: ignore_some_labels(build(*args))
    results = {}
    for name, overrides in runs:
        start = time.perf_counter()
        config = tiny_config(os.path.join(folder, name), *TINY, *overrides)
        history = train_module.train(config)
        results[name] = {"loss": [r["loss"] for r in history], "grad_norm": [r["grad_norm"] for r in history],
                         "seconds": time.perf_counter() - start}
        if dist.is_initialized():
            dist.barrier()
    return results


def runs_for(world_size: int) -> list[tuple[str, list[str]]]:
    return [(f"{layout}/{mode}", overrides + AC_MODES[mode])
            for layout, (size, overrides) in LAYOUTS.items() if size == world_size
            for mode in (AC_MODES if layout == "fsdp2_tp2" else ("none", "full", "op"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("single"))
    return run_distributed(train_runs, 1, folder, [(f"single/{mode}", AC_MODES[mode]) for mode in AC_MODES],
                           timeout=240)[0]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    return run_distributed(train_runs, 2, str(tmp_path_factory.mktemp("two")), runs_for(2), timeout=300)[0]


@pytest.fixture(scope="module")
def four_process_runs(tmp_path_factory):
    return run_distributed(train_runs, 4, str(tmp_path_factory.mktemp("four")), runs_for(4), timeout=400)[0]


def assert_same_run(run: dict, expected: dict, name: str) -> None:
    for key, rtol in (("loss", LOSS_RTOL), ("grad_norm", GRAD_NORM_RTOL)):
        assert len(run[key]) == len(expected[key]) == 10, name
        torch.testing.assert_close(torch.tensor(run[key], dtype=torch.float64),
                                   torch.tensor(expected[key], dtype=torch.float64), rtol=rtol, atol=0,
                                   msg=lambda m: f"{name} {key}: {m}")


def test_reference_learns_and_clips(reference):
    # The reference itself must be a meaningful run: clipping active (norm > 0.5), loss falling.
    single = reference["single/none"]
    assert single["loss"][-1] < single["loss"][0] - 0.05
    assert max(single["grad_norm"]) > 0.5


@pytest.mark.slow
def test_activation_checkpointing_matches_no_checkpointing(reference):
    for mode in ("full", "op", "layer2"):
        assert_same_run(reference[f"single/{mode}"], reference["single/none"], f"single/{mode}")


@pytest.mark.slow
def test_two_process_layouts_match_single_process(reference, two_process_runs):
    for name, run in two_process_runs.items():
        assert_same_run(run, reference["single/none"], name)


@pytest.mark.slow
def test_four_process_layouts_match_single_process(reference, four_process_runs):
    assert {name.split("/")[0] for name in four_process_runs} == {"fsdp2_tp2", "hsdp2x2"}
    for name, run in four_process_runs.items():
        assert_same_run(run, reference["single/none"], name)


# --- the mesh and the TP plan

def test_mesh_that_does_not_fit_the_world_is_refused():
    from titanlite.config.resolve import resolve

    config = load_config("debug_model", ["--parallelism.tensor_parallel_degree", "4"])
    with pytest.raises(ConfigError, match="world size 6 is not divisible by tensor_parallel_degree=4"):
        resolve(config, 6, 2048)
    config = load_config("debug_model", ["--parallelism.data_parallel_shard_degree", "3"])
    with pytest.raises(ConfigError, match="!= world size 4"):
        resolve(config, 4, 2048)


@pytest.mark.parametrize("overrides, culprit", [
    (["--parallelism.tensor_parallel_degree", "8"], "model.n_kv_heads=4"),  # debug model: 8 heads, 4 KV heads
    (["--parallelism.tensor_parallel_degree", "3"], "model.n_heads=8"),
    (["--parallelism.tensor_parallel_degree", "2", "--model.intermediate_size", "705"], "model.intermediate_size=705"),
    (["--parallelism.tensor_parallel_degree", "2", "--model.vocab_size", "2049"], "model.vocab_size=2049"),
])
def test_model_the_tp_degree_cannot_split_is_refused(overrides, culprit):
    with pytest.raises(ConfigError, match=culprit):
        load_config("debug_model", overrides)


def inspect_fsdp_tp_layout():
    """Build the tiny model on a 2 (FSDP) x 2 (TP) mesh and report shards, logits and init."""
    from torch.distributed.tensor import DTensor, Shard

    from titanlite.config.resolve import resolve
    from titanlite.model.transformer import build_model
    from titanlite.parallel.init import init_weights_layout_independent
    from titanlite.parallel.mesh import ParallelDims
    from titanlite.parallel.parallelize import parallelize
    from titanlite.parallel.tensor_parallel import loss_context

    config = tiny_config("unused", *TINY, "--parallelism.tensor_parallel_degree", "2")
    dims = ParallelDims.build(resolve(config, 4, 2048).layout, "cpu")
    model = build_model(config.model, config.training.seq_len)
    parallelize(model, dims, config.parallelism, config.activation_checkpoint, False, config.float8, torch.float32)
    init_weights_layout_independent(model, "cpu", 7)
    reference = build_model(config.model, config.training.seq_len, device="cpu")
    reference.init_weights(seed=7)
    max_init_error = max((p.full_tensor() - reference.get_parameter(n)).abs().max().item()
                         for n, p in model.named_parameters())
    shapes = {n: (tuple(p.to_local().shape), tuple(p.shape), tuple(map(str, p.placements)))
              for n, p in model.named_parameters()}
    names_match = [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    tokens = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(dims.data_parallel_rank))
    logits = model(tokens)
    is_vocab_sharded = isinstance(logits, DTensor) and logits.placements == (Shard(2),)
    with loss_context(dims.layout.tp_enabled)():
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        loss.backward()
    # The grad norm: one reduction over the whole mesh, the same on every rank, against float64.
    import warnings

    from titanlite.optim.step import global_grad_norm
    exact = sum((p.grad.full_tensor().double() ** 2).sum() for p in model.parameters()).sqrt().item()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        norm = global_grad_norm(list(model.parameters()))
    norms = [torch.zeros(())] * 4
    dist.all_gather(norms, norm)
    return {"init_error": max_init_error, "shapes": shapes, "names_match": names_match,
            "vocab_sharded_logits": is_vocab_sharded, "local_logits": tuple(logits.to_local().shape),
            "grad_norm_error": abs(norm.item() - exact) / exact, "grad_norms": [n.item() for n in norms],
            "warnings": [str(w.message) for w in caught]}


def test_tp_plan_shards_heads_ffn_and_vocab(tmp_path):
    results = run_distributed(inspect_fsdp_tp_layout, 4, timeout=120)
    for result in results:
        assert result["init_error"] == 0.0  # bitwise the single-process init
        assert result["names_match"]  # no wrapper prefixes: checkpoint keys stay stable
        assert result["vocab_sharded_logits"] and result["local_logits"] == (2, 32, 1024)
        shapes = result["shapes"]
        # (local, global, placements over (dp_shard, tp)); FSDP shards dim 0 on top of TP
        assert shapes["layers.0.attention.wq.weight"][:2] == ((16, 64), (64, 64))  # 4 heads -> 2 per TP rank
        assert shapes["layers.0.attention.wk.weight"][:2] == ((8, 64), (32, 64))  # 2 KV heads -> 1 per TP rank
        assert shapes["layers.0.attention.wo.weight"][:2] == ((32, 32), (64, 64))  # row-wise: input dim split
        assert shapes["layers.0.feed_forward.w1.weight"][:2] == ((32, 64), (128, 64))
        assert shapes["layers.0.feed_forward.w2.weight"][:2] == ((32, 64), (64, 128))
        assert shapes["tok_embeddings.weight"][:2] == ((512, 64), (2048, 64))  # vocab over TP, then FSDP
        assert shapes["output.weight"][:2] == ((512, 64), (2048, 64))
        assert shapes["norm.weight"][2] == ("S(0)", "R")  # sequence-parallel norm: FSDP-sharded, TP-replicated
        # One reduction of the squared norm: every rank the same number, within float32 rounding of
        # the float64 norm of the same gradients, and no warning of reductions that may disagree.
        assert len(set(result["grad_norms"])) == 1
        assert result["grad_norm_error"] < 5e-6  # float32 per-shard norms: measured 1.4e-6
        assert result["warnings"] == []


# --- torch.compile

@pytest.mark.slow
def test_compile_matches_eager(tmp_path):
    # Per-block compile (fullgraph: any graph break fails) on DTensor blocks (TP 2, with per-op
    # selective AC) and on FSDP2 blocks with the compiled loss, against eager TP 2.
    steps = ["--training.steps", "4"]
    runs = [("eager_tp2", steps + LAYOUTS["tp2"][1]),
            ("compiled_tp2_op", steps + LAYOUTS["tp2"][1] + AC_MODES["op"] + ["--compile.enable", "true"]),
            ("compiled_fsdp2", steps + ["--compile.enable", "true"])]
    results = run_distributed(train_runs, 2, str(tmp_path), runs, timeout=500)[0]
    for name in ("compiled_tp2_op", "compiled_fsdp2"):
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(torch.tensor(results[name][key]), torch.tensor(results["eager_tp2"][key]),
                                       rtol=1e-4, atol=0, msg=lambda m: f"{name} {key}: {m}")


# --- the recipes' layout: TP 8

TP8_RUN = ["--model.n_kv_heads", "8", "--training.steps", "6", "--training.global_batch_tokens", "4096",
           "--training.micro_batch_size", "2", "--training.grad_clip", "0.5", "--optimizer.lr", "3e-3",
           "--lr_schedule.warmup_tokens", "8192", "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false",
           "--metrics.enable_jsonl", "false", "--data.default_num_documents", "400", "--training.device", "cpu"]


def debug_model_runs(folder: str, overrides: list[str]) -> dict:
    """The debug model (dim 256, 8 heads, here 8 KV heads) for 6 steps; losses and grad norms."""
    import titanlite.train as train_module

    config = load_config("debug_model", [*TP8_RUN, "--job.dump_folder", folder, *overrides])
    history = train_module.train(config)
    return {"loss": [r["loss"] for r in history], "grad_norm": [r["grad_norm"] for r in history]}


@pytest.mark.slow
def test_tensor_parallel_8_matches_one_process(tmp_path):
    """The recipes' TP 8 (one 8-GPU node) on the debug model: 8 gloo processes against one."""
    single = run_distributed(debug_model_runs, 1, str(tmp_path / "single"), [], timeout=300)[0]
    tp8 = run_distributed(debug_model_runs, 8, str(tmp_path / "tp8"),
                          ["--parallelism.tensor_parallel_degree", "8"], timeout=600)
    assert single["loss"][-1] < single["loss"][0] - 0.5  # a run that learns
    assert all(result == tp8[0] for result in tp8)  # every rank logs the same numbers
    torch.testing.assert_close(torch.tensor(tp8[0]["loss"], dtype=torch.float64),
                               torch.tensor(single["loss"], dtype=torch.float64), rtol=LOSS_RTOL, atol=0)
    # The first grad norm compares the gradients of the same weights: float32 rounding only (the
    # vocabulary-sharded loss and sequence-parallel norms sum in another order). Later
    # ones drift further (measured 1.3e-4 at step 5): AdamW turns the rounding differences of
    # near-zero gradients into full-size updates, so the two runs' weights part slightly.
    assert tp8[0]["grad_norm"][0] == pytest.approx(single["grad_norm"][0], rel=1e-4)  # measured 5.5e-5
    torch.testing.assert_close(torch.tensor(tp8[0]["grad_norm"], dtype=torch.float64),
                               torch.tensor(single["grad_norm"], dtype=torch.float64), rtol=5e-4, atol=0)


# --- layout-independent init: bitwise the one-process init, one full parameter at a time

def init_in_the_original_order(model, seed: int) -> None:
    """The init written out in the order titanlite has always drawn it (an independent reference for
    model.init_plan(): reordering it would change every run's initial weights)."""
    import math

    from torch import nn

    torch.manual_seed(seed)
    c = model.config
    residual_std, head_std = c.init_std / math.sqrt(2 * c.n_layers), c.dim ** -0.5
    with torch.no_grad():
        nn.init.normal_(model.tok_embeddings.weight, mean=0.0, std=1.0)
        for block in model.layers.values():
            for linear in (block.attention.wq, block.attention.wk, block.attention.wv, block.feed_forward.w1,
                           block.feed_forward.w3):
                nn.init.trunc_normal_(linear.weight, std=c.init_std, a=-3 * c.init_std, b=3 * c.init_std)
            for linear in (block.attention.wo, block.feed_forward.w2):
                nn.init.trunc_normal_(linear.weight, std=residual_std, a=-3 * residual_std, b=3 * residual_std)
            block.attention_norm.weight.fill_(1.0)
            block.ffn_norm.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
        nn.init.trunc_normal_(model.output.weight, std=head_std, a=-3 * head_std, b=3 * head_std)


def cpu_memory_peak(fn) -> tuple[int, int]:
    """(peak, final) bytes allocated on the CPU while `fn()` runs, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = sorted((event.time_range.start, event.self_cpu_memory_usage) for event in prof.events()
                     if event.self_cpu_memory_usage)
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak, live


# 8 blocks and a 256-entry vocabulary: the largest parameter (embedding, head: 16,384 values) is a
# twentieth of the model, so "one parameter" and "the model" are far apart.
INIT_MODEL = ["--model.dim", "64", "--model.n_layers", "8", "--model.n_heads", "4", "--model.n_kv_heads", "2",
              "--model.intermediate_size", "128", "--model.vocab_size", "256", "--training.seq_len", "32"]


def init_under_layouts(layouts: list[tuple[int, int]]) -> dict:
    """For each (shard, tp) layout of the world: parallelize the meta model, init it layout-independently;
    report the largest difference from the original-order init and the init's transient CPU memory."""
    from titanlite.model.transformer import build_model
    from titanlite.parallel.init import init_weights_layout_independent
    from titanlite.parallel.mesh import ParallelDims
    from titanlite.parallel.parallelize import parallelize

    config = load_config("debug_model", INIT_MODEL + ["--training.device", "cpu"])
    reference = build_model(config.model, config.training.seq_len, "cpu")
    init_in_the_original_order(reference, seed=11)
    model_bytes = sum(p.numel() * 4 for p in reference.parameters())
    largest_bytes = max(p.numel() * 4 for p in reference.parameters())
    # What the previous init did: build and init the whole model in fp32 beside this rank's shard.
    old_peak, old_final = cpu_memory_peak(lambda: init_in_the_original_order(
        build_model(config.model, config.training.seq_len, "cpu"), seed=11))
    results = {"model_bytes": model_bytes, "largest_bytes": largest_bytes, "old_transient": old_peak - old_final}
    for shard, tp in layouts:
        dims = ParallelDims.build(Layout(replicate=1, shard=shard, tensor=tp), "cpu")
        model = build_model(config.model, config.training.seq_len)
        parallelize(model, dims, config.parallelism, config.activation_checkpoint, False, config.float8, torch.float32)
        peak, final = cpu_memory_peak(lambda: init_weights_layout_independent(model, "cpu", 11))
        full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p) for n, p in model.named_parameters()}
        results[f"shard{shard}_tp{tp}"] = {
            "max_difference": max((full[n] - p).abs().max().item() for n, p in reference.named_parameters()),
            "transient": peak - final}
    return results


def check_init(results: dict) -> None:
    for name, layout in results.items():
        if not name.startswith("shard"):
            continue
        assert layout["max_difference"] == 0.0, name  # bitwise the one-process init
        # One full parameter and what torch's trunc_normal_ allocates beside it (memory_estimate.INIT_TEMPORARIES),
        # never the model.
        assert layout["transient"] <= INIT_TEMPORARIES * results["largest_bytes"], (name, layout)
        assert layout["transient"] < results["model_bytes"] / 3, (name, layout)
    assert results["old_transient"] >= results["model_bytes"]  # the previous init: the whole model


def test_init_peak_is_one_parameter_not_the_model():
    check_init(init_under_layouts([(1, 1)]))


def test_sharded_init_is_bitwise_the_single_process_init_under_fsdp_and_tp():
    for results in run_distributed(init_under_layouts, 2, [(2, 1), (1, 2)], timeout=180):
        check_init(results)
