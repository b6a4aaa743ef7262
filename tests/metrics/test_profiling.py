"""Profiling: Chrome traces on the schedule, OOM reports naming step and phase, compile statistics."""

import json
import logging

import pytest
import torch
from conftest import HEALTH_RUN, tiny_config

from titanlite.config.load import load_config
from titanlite.metrics.profiling import OutOfMemory, TrainingProfiler, report_oom
from titanlite.train import train


def test_training_run_writes_a_chrome_trace_per_profiled_window(tmp_path):
    config = tiny_config(tmp_path, *HEALTH_RUN, "--training.steps", "8", "--metrics.log_freq", "4",
        "--profiling.enable_profiling", "true", "--profiling.profile_freq", "4",
        "--profiling.profile_warmup", "1", "--profiling.profile_active", "1")
    train(config)
    traces = sorted((tmp_path / "profile_traces").glob("step-*/rank0_trace.json"))
    assert [path.parent.name for path in traces] == ["step-4", "step-8"]  # one window of 4 steps each
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("aten::mm" in event.get("name", "") for event in events)  # the model's matmuls are in it


def raise_oom(grad):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_oom_in_backward_names_step_and_phase_and_leaves_a_report(tmp_path):
    weight = torch.randn(4, 4, requires_grad=True)
    loss = (weight * 2).sum()
    weight.register_hook(raise_oom)
    with pytest.raises(OutOfMemory) as error:
        with report_oom(123, tmp_path, 0, torch.device("cpu")):
            loss.backward()
    message = str(error.value)
    assert "at step 123 during the backward" in message and "micro_batch_size" in message
    report = (tmp_path / "oom" / "step-123-rank0.txt").read_text()
    assert report.startswith("CUDA out of memory at step 123, rank 0, during the backward")


def test_oom_in_forward_is_the_forward(tmp_path):
    class Exploding(torch.nn.Module):
        def forward(self, x):
            raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(OutOfMemory, match="at step 7 during the forward"):
        with report_oom(7, tmp_path, 0, torch.device("cpu")):
            Exploding()(torch.zeros(1))


def test_compile_stats_count_frames_and_warn_on_recompilation(tmp_path, caplog):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    profiler = TrainingProfiler(load_config(None).profiling, tmp_path, 0, torch.device("cpu"))
    assert profiler.compile_stats(1) == {}  # nothing compiled yet

    @torch.compile(backend="eager", dynamic=False)
    def double(x):
        return x * 2

    double(torch.ones(3))
    first = profiler.compile_stats(1)
    assert first["compile/frames"] == 1 and first["compile/seconds"] > 0
    with caplog.at_level(logging.WARNING, logger="titanlite"):
        double(torch.ones(5))  # a new static shape: dynamo recompiles
        assert profiler.compile_stats(10)["compile/frames"] == 2
    assert "TORCH_LOGS=recompiles" in caplog.text
    torch._dynamo.reset()


def test_trace_summary_counts_the_kernels_of_the_profiled_steps_only(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from trace_summary import summarize

    def kernel(name, ts, dur, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    steps = [{"ph": "X", "cat": "gpu_user_annotation", "name": f"ProfilerStep#{n}", "ts": start, "dur": 1000}
             for n, start in ((9, 0), (10, 2000))]
    events = steps + [
        kernel("nvjet_sm90_tst_NNT", 10, 600), kernel("nvjet_sm90_tst_NNT", 2010, 400),    # in the steps
        kernel("cudnn_flash_bprop", 700, 100), kernel("triton_poi_fused_add_0", 2500, 50),
        kernel("Memset (Device)", 900, 10, cat="gpu_memset"),
        kernel("nvjet_sm90_tst_NNT", 1500, 5000),  # between the steps: not counted
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 20, "dur": 900}]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    summary = summarize(path)
    assert summary["steps"] == 2 and summary["span_ms"] == pytest.approx(1.0)
    assert summary["groups_ms"]["matmul"] == pytest.approx((0.6 + 0.4) / 2)
    assert summary["groups_ms"]["attention"] == pytest.approx(0.05)
    assert summary["groups_ms"]["triton"] == pytest.approx(0.025)
    assert summary["groups_ms"]["copy"] == pytest.approx(0.005)
    assert summary["kernels"]["nvjet_sm90_tst_NNT"] == {"ms": pytest.approx(0.5), "calls": 1.0}
