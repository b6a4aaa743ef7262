"""MetricLogger's throughput, MFU and data-wait arithmetic against hand-computed values, and the peak table."""

import json
import logging
import math
import struct
import sys
import time
import zlib

import pytest
import torch

import titanlite.metrics.logger as metrics
from titanlite.config.load import load_config
from titanlite.config.settings import ConfigError
from titanlite.job.folder import start_run_records
from titanlite.metrics.logger import MetricLogger, format_record, peak_flops_per_device, start_wandb


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_throughput_mfu_and_data_wait_per_window(tmp_path, monkeypatch):
    clock = FakeClock(100.0)
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    logger = MetricLogger(tmp_path, 0, flops_per_token=1000, peak_flops=8.192e6, tensorboard=False, jsonl=True,
                          device=torch.device("cpu"))
    logger.count(4096, 0.5)
    logger.count(4096, 0.25)
    clock.now = 102.0  # 8192 tokens in 2 s, 0.75 s of it waiting for data
    first = logger.log(10, {"loss": 2.0})
    assert first["tokens_per_second_per_device"] == 4096.0
    assert first["tflops_per_device"] == pytest.approx(4096 * 1000 / 1e12, rel=1e-12)
    assert first["mfu_percent"] == pytest.approx(50.0, rel=1e-12)  # 4.096e6 of 8.192e6 FLOP/s
    assert first["data_wait_fraction"] == pytest.approx(0.375, rel=1e-12)
    logger.count(1024, 0.0)
    clock.now = 104.0  # the window restarted at the last log: 1024 tokens in 2 s, no wait
    second = logger.log(20, {"loss": 1.5})
    assert second["tokens_per_second_per_device"] == 512.0 and second["data_wait_fraction"] == 0.0
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == logger.history == [first, second]
    text = format_record(first)
    assert "step: 10  loss: 2.0000" in text and "tokens/s/device: 4,096" in text and "mfu: 50.0%" in text


def test_progress_elapsed_eta_and_tokens_seen(tmp_path, monkeypatch):
    clock = FakeClock(50.0)
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    logger = MetricLogger(tmp_path, 0, 1000, 0.0, tensorboard=False, jsonl=True, device=torch.device("cpu"),
                          total_steps=100, start_step=10)  # resumed after step 10
    clock.now = 80.0  # steps 11..20 in 30 s: 3 s a step, 80 steps to go
    record = logger.log(20, {"loss": 2.0, "tokens_seen": 163840})
    assert record["total_steps"] == 100 and record["elapsed_s"] == 30.0 and record["eta_s"] == 240.0
    clock.now = 3770.0  # steps 21..30 in 3690 s
    later = logger.log(30, {"loss": 1.9, "tokens_seen": 245760})
    assert later["elapsed_s"] == 3720.0 and later["eta_s"] == 70 * 369.0
    text = format_record(later)
    assert text.startswith("step: 30/100  loss: 1.9000  tokens: 245,760  elapsed 1:02:00 eta 7:10:30")
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["tokens_seen"] == 245760
    rolled_back = logger.log(25, {"loss": 1.8})  # a rollback moved the step back: no ETA from this window
    assert "eta_s" not in rolled_back and format_record(rolled_back).startswith("step: 25/100  loss: 1.8000  elapsed")


def test_no_mfu_without_a_peak(tmp_path):
    logger = MetricLogger(tmp_path, 0, 1000, 0.0, tensorboard=False, jsonl=False, device=torch.device("cpu"))
    logger.count(10, 0.0)
    assert "mfu_percent" not in logger.log(1, {"loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("name, dense_bf16", [  # NVIDIA datasheets, dense (the sparse figure is 2x)
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12)])
def test_peak_flops_of_known_gpus(monkeypatch, name, dense_bf16):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops_per_device(torch.device("cuda", 0)) == dense_bf16


def test_peak_flops_override_cpu_and_unknown(monkeypatch, caplog):
    assert peak_flops_per_device(torch.device("cpu")) == 0.0
    assert peak_flops_per_device(torch.device("cpu"), override=123e12) == 123e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with caplog.at_level(logging.WARNING, logger="titanlite"):
        assert peak_flops_per_device(torch.device("cuda", 0)) == 0.0
    assert "set metrics.peak_flops" in caplog.text


def test_a_fresh_run_moves_an_earlier_runs_records_aside_and_a_resumed_one_continues(tmp_path):
    from conftest import tiny_config

    from titanlite.train import train

    first = train(tiny_config(tmp_path, "--training.steps", "2"))
    second = train(tiny_config(tmp_path, "--training.steps", "3"))  # no checkpoint: a fresh run
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [r["step"] for r in second] == [1, 2, 3]  # not 1, 2, 1, 2, 3
    (aside,) = (tmp_path / "previous_runs").iterdir()
    kept = [json.loads(line) for line in (aside / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in kept] == [r["step"] for r in first] == [1, 2]
    assert json.loads((aside / "config.json").read_text())["training"]["steps"] == 2
    assert json.loads((tmp_path / "config.json").read_text())["derived"]["total_steps"] == 3

    resumable = tmp_path / "resumable"
    train(tiny_config(resumable, "--training.steps", "2", "--checkpoint.enable", "true"))
    train(tiny_config(resumable, "--training.steps", "4", "--checkpoint.enable", "true"))  # resumes at step 3
    rows = [json.loads(line) for line in (resumable / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and not (resumable / "previous_runs").exists()


def test_an_unwritable_dump_folder_is_one_config_error(tmp_path):
    from titanlite.config.settings import ConfigError
    from titanlite.job.folder import check_dump_folder

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"job.dump_folder=.*file/run is not writable"):
        check_dump_folder(blocker / "run")


def test_a_full_disk_stops_metrics_jsonl_not_the_run(tmp_path, caplog):
    """/dev/full fails every write with ENOSPC, as a full disk does: one warning, and logging goes on."""
    from pathlib import Path

    if not Path("/dev/full").is_char_device():
        pytest.skip("no /dev/full on this system")
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    logger = MetricLogger(tmp_path, 0, 1000, 0.0, tensorboard=False, jsonl=True, device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="titanlite"):
        records = [logger.log(step, {"loss": 2.0}) for step in (1, 2, 3)]
        logger.close()
    assert logger.history == records
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert warning == (f"metrics: cannot write {tmp_path / 'metrics.jsonl'} (No space left on device): it stops at "
                       "step 1, training goes on (the log lines keep the metrics)")


# --- wandb (optional extra), in its offline mode: nothing leaves the machine

def offline_wandb(monkeypatch, tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'titanlite[wandb]'): W&B logging untested")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false"}.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    return load_config(None, ["--metrics.enable_wandb", "--metrics.wandb_project", "titanlite-test"]).metrics


def read_wandb_records(path):
    """The records of an offline W&B run's transaction log (run-<id>.wandb), as far as it is written.

    The file is a 7-byte ':W&B' header, then LevelDB log chunks in 32 KiB blocks (each: crc32 of type and
    data, 2-byte length, type 1 full / 2 first / 3 middle / 4 last), each record a wandb_internal Record
    protobuf. wandb-core writes it from another process, so a chunk cut short or failing its checksum is
    where the written part ends.
    """
    from wandb.proto import wandb_internal_pb2

    data, position, block, pending, records = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            break
        pending += chunk
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def read_wandb_history(path, timeout_s=60.0) -> list[dict]:
    """The rows an offline W&B run logged, once its log holds the exit record that finish() writes."""
    deadline = time.monotonic() + timeout_s
    records = read_wandb_records(path)
    while not any(record.HasField("exit") for record in records):
        assert time.monotonic() < deadline, f"{path} has no exit record {timeout_s:.0f} s after finish()"
        time.sleep(0.2)
        records = read_wandb_records(path)
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            rows.append({key: json.loads(value) for key, value in items.items()
                         if not key.startswith("_")})  # not wandb's own _step, _runtime, _timestamp
    return rows


def test_wandb_logs_what_metrics_jsonl_holds(tmp_path, monkeypatch):
    settings = offline_wandb(monkeypatch, tmp_path)
    run = start_wandb(settings, {"training": {"steps": 3}}, tmp_path)
    logger = MetricLogger(tmp_path, 0, flops_per_token=1000, peak_flops=1e9, tensorboard=False, jsonl=True,
                          device=torch.device("cpu"), wandb_run=run)
    for step, loss in [(1, 7.5), (2, math.nan), (3, 6.25), (2, 6.5)]:  # a NaN loss; steps go back after a rollback
        logger.count(256, 0.01)
        logger.log(step, {"loss": loss, "lr": 1e-3 * step, "overflow_steps": int(step == 2)})
    logger.close()
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (log_file,) = tmp_path.glob(f"wandb/offline-run-*/run-{run.id}.wandb")
    logged = read_wandb_history(log_file)
    assert [row["step"] for row in logged] == [1, 2, 3, 2]  # every row kept, none dropped for going back
    assert len(logged) == len(written)
    for row, record in zip(logged, written):
        assert row.keys() == record.keys()
        for key, value in record.items():
            assert row[key] == value or (math.isnan(row[key]) and math.isnan(value)), key


def test_a_resumed_run_continues_its_wandb_run_and_a_fresh_one_starts_another(tmp_path, monkeypatch):
    settings = offline_wandb(monkeypatch, tmp_path)
    first = start_wandb(settings, {}, tmp_path)
    first.finish()
    resumed = start_wandb(settings, {}, tmp_path)  # same folder, records not moved: a resume
    resumed.finish()
    assert resumed.id == first.id
    start_run_records(tmp_path, {}, resumed=False)  # a fresh run moves the earlier records aside
    fresh = start_wandb(settings, {}, tmp_path)
    fresh.finish()
    assert fresh.id != first.id
    assert (tmp_path / "wandb" / "run_id").read_text() == fresh.id


def test_wandb_enabled_but_missing_is_one_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"^metrics.enable_wandb=true but wandb is not installed: "
                                          r"pip install 'titanlite\[wandb\]'"):
        start_wandb(load_config(None, ["--metrics.enable_wandb"]).metrics, {}, tmp_path)
    assert start_wandb(load_config(None).metrics, {}, tmp_path) is None  # off: wandb is never imported


def test_wandb_without_an_api_key_is_one_config_error(tmp_path, monkeypatch):
    """Online mode with no API key anywhere: wandb.init raises UsageError before any network access."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'titanlite[wandb]'): W&B logging untested")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HOME", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "NETRC"):
        monkeypatch.setenv(name, str(tmp_path / "home"))
    import wandb

    wandb.teardown()  # the earlier tests' wandb set-up (offline mode, read once) would otherwise apply
    settings = load_config(None, ["--metrics.enable_wandb"]).metrics
    with pytest.raises(ConfigError) as caught:
        start_wandb(settings, {}, tmp_path / "run")
    message = str(caught.value)
    assert message.startswith("metrics.enable_wandb=true but W&B cannot start (") and "\n" not in message
    assert message.endswith("run `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to log locally, or "
                            "metrics.enable_wandb=false")
