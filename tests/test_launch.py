"""run_train.sh and titanlite/launch.py for real (subprocesses, CPU): fast config errors, titanlite's
one line and exit code through torchrun, the user's folder kept, CONFIG_FILE; what the wheel ships; and
that every command's usage line names the command a user types."""

import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN_TRAIN = REPO / "run_train.sh"
TINY = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
        "--model.intermediate_size", "128", "--training.seq_len", "32", "--training.micro_batch_size", "4",
        "--training.global_batch_tokens", "256", "--training.device", "cpu", "--training.mixed_precision", "fp32",
        "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false", "--lr_schedule.warmup_tokens", "0"]


def launch(cwd: Path, *arguments: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """./run_train.sh from `cwd` with `env` added (and no inherited CONFIG_FILE/NGPU/LOG_RANK)."""
    environment = {key: value for key, value in os.environ.items() if key not in ("CONFIG_FILE", "NGPU", "LOG_RANK")}
    return subprocess.run([str(RUN_TRAIN), *arguments], cwd=cwd, env={**environment, **env}, capture_output=True,
                          text=True, timeout=timeout)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_config_error_is_one_line_before_torch_is_imported(tmp_path):
    poisoned = tmp_path / "poisoned"  # a `torch` that fails on import: the check must not need it
    (poisoned / "torch").mkdir(parents=True)
    (poisoned / "torch" / "__init__.py").write_text("raise SystemExit('torch was imported')\n")
    result = launch(tmp_path, "--training.stepz", "3", PYTHONPATH=str(poisoned))  # NGPU unset: not counted yet
    assert result.returncode == 2 and result.stdout == ""
    (line,) = lines(result.stderr)
    assert line.startswith("titanlite: config error: ") and "training.stepz" in line

    result = launch(tmp_path, "--config", "7b_4k", CONFIG_FILE="debug_model.toml", PYTHONPATH=str(poisoned))
    assert result.returncode == 2
    assert lines(result.stderr) == ["titanlite: config error: CONFIG_FILE=debug_model.toml and --config 7b_4k "
                                    "disagree: give the config once"]


def test_a_layout_that_does_not_fit_the_processes_is_refused_before_torch_is_imported(tmp_path):
    poisoned = tmp_path / "poisoned"
    (poisoned / "torch").mkdir(parents=True)
    (poisoned / "torch" / "__init__.py").write_text("raise SystemExit('torch was imported')\n")
    result = launch(tmp_path, "--config", "7b_4k", PYTHONPATH=str(poisoned), NGPU="1")
    assert result.returncode == 2
    assert lines(result.stderr) == ["titanlite: config error: world size 1 is not divisible by tensor_parallel_degree=8 "
                                    "x data_parallel_replicate_degree=1: launch a multiple of 8 processes"]
    result = launch(tmp_path, "--training.global_batch_tokens", "3000", PYTHONPATH=str(poisoned), NGPU="2")
    assert result.returncode == 2 and "training.global_batch_tokens=3000: must be a multiple of" in result.stderr


def test_a_data_error_in_one_process_is_titanlites_line_and_status(tmp_path):
    result = launch(tmp_path, *TINY, "--data.source", "./no-such-data", NGPU="1")
    assert result.returncode == 2
    assert lines(result.stderr)[-1] == "titanlite: data error: data.source=./no-such-data: no such file or folder: check the path"
    assert "Traceback" not in result.stderr + result.stdout


def test_a_data_error_under_torchrun_is_titanlites_line_and_status_not_a_traceback(tmp_path):
    result = launch(tmp_path, *TINY, "--data.source", "./no-such-data", NGPU="2")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "[rank0]:titanlite: data error: data.source=./no-such-data: no such file or folder: check the path" in lines(output)
    assert "Traceback" not in output and "ChildFailedError" not in output and "FAILED" not in output


WORKER = """
import os, sys, time
from titanlite.job.exits import report_to_launcher

if os.environ["RANK"] == "1":  # its output is not shown (LOG_RANK=0): the launcher must say why it stopped
    report_to_launcher("titanlite: stopped by the health monitor: divergence at step 9")
    sys.exit(3)
time.sleep(120)  # rank 0 would go on: torchrun stops it once rank 1 has failed
"""


def test_a_failure_on_a_hidden_rank_is_reported_with_its_line_and_status(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    code = ("import sys; from titanlite.launch import run_torchrun, torchrun_arguments; "
            "sys.exit(run_torchrun(torchrun_arguments(2, ['worker.py'])))")
    environment = {key: value for key, value in os.environ.items() if key != "LOG_RANK"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**environment, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 3, result.stderr
    assert lines(result.stderr)[-1] == "titanlite: stopped by the health monitor: divergence at step 9 (rank 1)"
    assert "Traceback" not in result.stderr + result.stdout


def test_the_rank_that_said_why_is_reported_over_a_shown_peer_that_crashed_after_it(monkeypatch, capsys):
    """Rank 1 (hidden) stops on a DataError; rank 0 (shown) dies on the broken connection in the same
    second: the launcher reports rank 1's line and exit status, not rank 0's."""
    from types import SimpleNamespace

    from titanlite.launch import exit_code_of_failure

    monkeypatch.setenv("LOG_RANK", "0")
    failures = {0: SimpleNamespace(exitcode=1, local_rank=0, timestamp=100, message={"error": "gloo closed"}),
                1: SimpleNamespace(exitcode=2, local_rank=1, timestamp=100,
                                   message="titanlite: data error: shard x.parquet is corrupt")}
    error = SimpleNamespace(failures=failures, format_msg=lambda: "torchrun summary")
    assert exit_code_of_failure(error) == 2
    assert "titanlite: data error: shard x.parquet is corrupt (rank 1)" in capsys.readouterr().err


def test_paths_are_relative_to_the_launch_folder_and_config_file_is_honoured(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.toml").write_text(
        '[job]\ndump_folder = "runs/tiny"\ndescription = "from CONFIG_FILE"\n'
        '[data]\nsource = "corpus.jsonl"\n[training]\nsteps = 2\n')
    sentences = ("The river runs past the old mill and the children count the boats. " * 3).strip()
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": f"{i}: {sentences}"}) + "\n" for i in range(60)))
    result = launch(tmp_path, *TINY, CONFIG_FILE="configs/tiny.toml", NGPU="1")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "tiny"
    config = json.loads((run / "config.json").read_text())
    assert config["job"]["description"] == "from CONFIG_FILE" and config["data"]["source"] == "corpus.jsonl"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_the_wheel_ships_the_recipes_the_launcher_the_licence_and_its_dependencies(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} cannot build it offline (pyproject.toml needs >= 77)")
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info/ next to the sources
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "__pycache__", "build", "*.egg-info", "outputs",
                                                                 "runs", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("titanlite-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
        archive.extractall(tmp_path / "installed")
    recipes = {path.name for path in (REPO / "train_configs").glob("*.toml")}
    assert {f"titanlite/train_configs/{name}" for name in recipes} <= names and len(recipes) == 7
    assert {"titanlite/launch.py", "titanlite/data/assets/default.tiktoken"} <= names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert "titanlite-run = titanlite.launch:main" in entry_points
    assert "License-Expression: MIT" in metadata
    assert {"Requires-Dist: numpy", "Requires-Dist: tqdm", 'Requires-Dist: wandb; extra == "wandb"'} <= \
        set(metadata.splitlines())
    # Installed without the checkout around it, a recipe is still found by name.
    code = "from titanlite.config.load import load_config; print(load_config('7b_4k').model.dim)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "installed")}, timeout=60)
    assert result.stdout.strip() == "4096", result.stderr


@pytest.mark.parametrize("command, argv", [
    ("prepare", ["--help"]), ("convert", ["--help"]), ("convert", ["to-hf", "--help"]), ("generate", ["--help"]),
    ("plan", ["--help"]), ("diagnose", ["--help"]), ("train", ["--help"]),
])
def test_each_commands_usage_line_names_how_it_is_run(command, argv, monkeypatch, capsys):
    """argparse's default prog is the file name (`usage: diagnose.py`), which is no command anyone types."""
    monkeypatch.delenv("TITANLITE_PROG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"titanlite.{command}").main(argv)
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m titanlite.{command} {' '.join(argv[:-1])}".rstrip())


def test_the_launchers_help_names_the_launcher_not_the_trainer(tmp_path):
    """The launcher hands --help to titanlite.train in one process; the usage line still says what was typed."""
    assert launch(tmp_path, "--help").stdout.startswith(f"usage: {RUN_TRAIN} [-h] [--config CONFIG]")
    environment = {key: value for key, value in os.environ.items() if key != "TITANLITE_PROG"}
    environment["PYTHONPATH"] = str(REPO)
    module = subprocess.run([sys.executable, "-m", "titanlite.launch", "--help"], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert module.stdout.startswith("usage: python -m titanlite.launch [-h]"), module.stderr
