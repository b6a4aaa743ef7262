"""run_train.sh and titanlite/launch.py for real (subprocesses, CPU): fast config errors, titanlite's
one line and exit code through torchrun, the user's folder kept, CONFIG_FILE; what the wheel ships; and
that every command's usage line names the command a user types."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
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


@pytest.mark.slow
def test_finished_two_process_runs_exit_0(tmp_path):
    """Finished 2-process runs used to abort at interpreter exit (SIGABRT: exit 134, "terminate called
    without an active exception") in about half the runs with checkpoints: a resume from one process
    on FSDP 2 saving asynchronously, and TP 2 saving synchronously. scripts/stress_exits.py repeats
    such runs; one of each here."""
    saving = ["--checkpoint.enable", "true", "--checkpoint.interval", "2", "--metrics.log_freq", "2"]
    runs = [("1", tmp_path / "resumed", ["--training.steps", "2"]),
            ("2", tmp_path / "resumed", ["--training.steps", "4", "--parallelism.data_parallel_shard_degree", "2",
                                         "--checkpoint.async_mode", "async"]),
            ("2", tmp_path / "tp", ["--training.steps", "2", "--parallelism.tensor_parallel_degree", "2"])]
    for ngpu, folder, arguments in runs:
        result = launch(tmp_path, *TINY, *saving, *arguments, "--job.dump_folder", str(folder), NGPU=ngpu,
                        LOG_RANK="0,1")
        output = result.stdout + result.stderr
        assert result.returncode == 0 and "terminate called" not in output, output
    assert (tmp_path / "resumed" / "checkpoint" / "step-00000004" / "meta.json").is_file()
    assert (tmp_path / "tp" / "checkpoint" / "step-00000002" / "meta.json").is_file()


STOPPING_WORKER = """
import os, signal, sys, time
from pathlib import Path
from titanlite.job.exits import die_with_launcher

die_with_launcher()


def stop(signum, frame):  # as the trainer does: finish the step, save, exit 4 (here: a second's work)
    time.sleep(1)
    print(f"rank {os.environ['RANK']} stopped on {signal.Signals(signum).name}", flush=True)
    sys.exit(4)


for name in os.environ.get("STOP_ON", "").split():
    signal.signal(getattr(signal, name), stop)
for name in os.environ.get("IGNORE", "").split():
    signal.signal(getattr(signal, name), signal.SIG_IGN)
Path(f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
while True:
    time.sleep(0.1)
"""


def start_launcher(folder: Path, **env: str) -> subprocess.Popen:
    """titanlite's launcher running STOPPING_WORKER on 2 ranks (both shown); returns once both run."""
    (folder / "worker.py").write_text(STOPPING_WORKER)
    code = ("import sys; from titanlite.launch import run_torchrun, torchrun_arguments; "
            "sys.exit(run_torchrun(torchrun_arguments(2, ['worker.py'])))")
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LOG_RANK": "0,1", **env}
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=folder, env=environment, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not all((folder / f"rank{rank}.pid").is_file() for rank in (0, 1)):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate(timeout=30)[0]
        time.sleep(0.1)
    time.sleep(0.2)  # the pid files are written after the workers' signal handlers are set
    return launcher


def rank_pids(folder: Path) -> list[int]:
    return [int((folder / f"rank{rank}.pid").read_text()) for rank in (0, 1)]


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"  # a zombie has stopped running; its new parent may not reap it


@pytest.mark.parametrize("stop_signal", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_signal_to_the_launcher_is_passed_to_the_ranks_and_their_exit_code_kept(tmp_path, stop_signal):
    """SIGTERM (preemption), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's warning) to the launcher reach every
    rank as the same signal; the launcher waits for them to stop on their own and exits with their code,
    not torchrun's SignalException and SIGTERM, SIGKILL 30 s later."""
    launcher = start_launcher(tmp_path, STOP_ON="SIGTERM SIGINT SIGUSR1")
    launcher.send_signal(getattr(signal, stop_signal))
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 4, output
    assert f"[rank0]:rank 0 stopped on {stop_signal}" in output and f"[rank1]:rank 1 stopped on {stop_signal}" in output
    assert "Traceback" not in output and "SignalException" not in output


def test_ranks_that_do_not_stop_within_the_grace_are_killed(tmp_path):
    launcher = start_launcher(tmp_path, TITANLITE_STOP_GRACE_S="1", IGNORE="SIGTERM")  # stuck ranks
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 128 + signal.SIGKILL, output
    assert output.count("did not stop within 1 s of SIGTERM: killed") == 2, output
    assert not any(is_running(pid) for pid in rank_pids(tmp_path))


def test_the_ranks_die_with_a_killed_launcher(tmp_path):
    launcher = start_launcher(tmp_path)
    launcher.kill()  # kill -9: no handler runs; torchrun started the ranks in sessions of their own
    launcher.communicate(timeout=30)
    deadline = time.monotonic() + 5
    while any(is_running(pid) for pid in rank_pids(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    running = [pid for pid in rank_pids(tmp_path) if is_running(pid)]
    for pid in running:  # leave nothing behind, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not running, "the ranks outlived their launcher"


def test_a_rank_whose_launcher_died_before_it_started_stops_at_once(tmp_path):
    """The parent-death signal is armed in main, seconds after torchrun started the rank (imports):
    a rank whose launcher is already gone (its parent is not TITANLITE_LAUNCHER_PID) stops."""
    code = "from titanlite.job.exits import die_with_launcher; die_with_launcher(); print('trained on')"
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TORCHELASTIC_RUN_ID": "test",
                   "TITANLITE_LAUNCHER_PID": str(os.getpid() + 1)}  # not this rank's parent
    result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGKILL and result.stdout == ""
    assert lines(result.stderr) == [f"titanlite: the launcher (pid {os.getpid() + 1}) is gone: this rank stops"]


def test_a_killed_rank_is_the_reported_cause_not_its_stopped_peer(tmp_path):
    """kill -9 of rank 1: torchrun then stops rank 0 with SIGTERM (here it exits 4, as the trainer
    does when stopped); the launcher names rank 1 and SIGKILL and exits 137, not 143 or 4."""
    launcher = start_launcher(tmp_path, STOP_ON="SIGTERM")
    rank1 = rank_pids(tmp_path)[1]
    os.kill(rank1, signal.SIGKILL)
    output = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 128 + signal.SIGKILL, output
    assert lines(output)[-1] == f"titanlite: rank 1 (pid {rank1}) was killed by SIGKILL; the other ranks were stopped"
    assert "[rank0]:rank 0 stopped on SIGTERM" in output


def test_the_root_cause_is_the_earliest_failure_and_a_signal_other_than_sigterm(monkeypatch, capsys):
    from types import SimpleNamespace

    from titanlite.launch import exit_code_of_failure, root_cause_rank

    def failure(exitcode, timestamp, message=None, local_rank=0):
        return SimpleNamespace(exitcode=exitcode, timestamp=timestamp, message=message, local_rank=local_rank, pid=7)

    monkeypatch.setenv("LOG_RANK", "0")
    # Same second: the killed rank, not the one torchrun stopped (SIGTERM) nor one that crashed on the
    # broken connection (status 1), whichever is shown.
    assert root_cause_rank({0: failure(-15, 100), 1: failure(-9, 100, local_rank=1)}) == 1
    assert root_cause_rank({0: failure(1, 100), 1: failure(-9, 100, local_rank=1)}) == 1
    # An earlier failure wins: rank 0 crashed (SIGSEGV) and rank 1 was killed after torchrun's grace.
    assert root_cause_rank({0: failure(-11, 100), 1: failure(-9, 131, local_rank=1)}) == 0
    # Timestamps are whole seconds, taken when torchrun polls: the next second is as early.
    assert root_cause_rank({0: failure(1, 100), 1: failure(-9, 101, local_rank=1)}) == 1
    # A titanlite line over a plain status, and over a rank stopped by SIGTERM after leaving its own.
    line = "titanlite: data error: shard x.parquet is corrupt"
    assert root_cause_rank({0: failure(1, 100), 1: failure(2, 100, line, local_rank=1)}) == 1
    assert root_cause_rank({0: failure(-15, 100, line), 1: failure(2, 100, line, local_rank=1)}) == 1
    # All stopped on a signal (exit 4): any of them, with code 4 and no line of the launcher's.
    error = SimpleNamespace(failures={0: failure(4, 100), 1: failure(4, 100, local_rank=1)})
    assert exit_code_of_failure(error) == 4 and capsys.readouterr().err == ""


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
