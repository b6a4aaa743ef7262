"""`titanlite-run` (and ./run_train.sh): check the config, then start the training processes.

    titanlite-run [--config NAME_OR_PATH] [--section.key value ...]
    CONFIG_FILE=my.toml titanlite-run ...          # torchtitan's spelling of --config

Environment: NGPU (processes on this node; default: visible GPUs, else 1), NNODES, NODE_RANK,
MASTER_ADDR, MASTER_PORT (torchrun's static rendezvous) or RDZV_ENDPOINT and RDZV_ID (c10d
rendezvous), LOG_RANK (local ranks whose output is shown, default 0), TITANLITE_STOP_GRACE_S
(seconds the ranks may take to stop after SIGTERM, SIGINT or SIGUSR1, default 300: see
job/stop_signals.py). Paths in the config and on the command line are relative to the folder you
launch from.

Three steps, chosen so that every failure reads as one titanlite line with its exit code
(2 bad input, 1 checkpoint or memory, 3 stopped by the health monitor):
1. The config is loaded and validated before torch is imported (config.py imports no torch), so
   a typo is reported in well under a second.
2. One process on one node: exec `python -m titanlite.train` directly. It prints its own line and
   exits with its own code; no torchrun, no extra process.
3. Otherwise torchrun, run in this process (torch.distributed.run) rather than as the `torchrun`
   command: the command wraps a failed worker in a ~25-line ChildFailedError traceback and exit
   status 1. Here the failure is caught and mapped back: the exit code is the failed rank's, and
   its message is the one line the trainer left in torch elastic's per-worker error file
   (TORCHELASTIC_ERROR_FILE, see job/exits.py), printed when that rank's output is not
   already on screen. A rank killed by a signal is named in one line with the signal, and the
   exit code is 128 + its number; the reported rank is the root cause, not a peer that torchrun
   stopped because of it (root_cause_rank).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from titanlite.config.load import load_config
from titanlite.config.resolve import data_parallel_shape, gradient_accumulation_steps
from titanlite.config.settings import ConfigError
from titanlite.job.stop_signals import forward_stop_signals, stop_grace_seconds

PASS_THROUGH_FLAGS = ("-h", "--help", "--print-config")  # handled by titanlite.train itself, in one process


def split_config_argument(argv: list[str], config_file: str | None) -> tuple[str, list[str]]:
    """(the config to train, the other arguments); CONFIG_FILE and --config may not disagree."""
    config, rest, index = None, [], 0
    while index < len(argv):
        argument = argv[index]
        if argument == "--config":
            if index + 1 >= len(argv):
                raise ConfigError("--config needs a value: a TOML file or a name in train_configs/")
            config, index = argv[index + 1], index + 2
        elif argument.startswith("--config="):
            config, index = argument.removeprefix("--config="), index + 1
        else:
            rest.append(argument)
            index += 1
    if config_file and config and Path(config_file) != Path(config):
        raise ConfigError(f"CONFIG_FILE={config_file} and --config {config} disagree: give the config once")
    return config or config_file or "debug_model", rest


def launcher_name() -> str:
    """What the user typed to start the launcher, for usage lines: run_train.sh sets TITANLITE_PROG to its own
    path; the installed script is titanlite-run; else `python -m titanlite.launch`."""
    if os.environ.get("TITANLITE_PROG"):
        return os.environ["TITANLITE_PROG"]
    return "titanlite-run" if Path(sys.argv[0]).name == "titanlite-run" else "python -m titanlite.launch"


def visible_devices() -> int:
    """Accelerators this node can use (torch's count, which honours CUDA_VISIBLE_DEVICES); 0 on CPU."""
    import torch  # only when NGPU is not given: importing torch takes seconds

    return torch.cuda.device_count()


def positive_int(name: str) -> int:
    text = os.environ[name]
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{name}={text!r}: must be a whole number >= 1")
    return int(text)


def torchrun_arguments(nproc: int, worker: list[str]) -> list[str]:
    """torchrun's command line for this node, from the launcher's environment variables; `worker` is
    what each process runs (["-m", "titanlite.train", ...])."""
    nnodes = os.environ.get("NNODES", "1")
    arguments = ["--nproc_per_node", str(nproc), "--nnodes", nnodes]
    if os.environ.get("RDZV_ENDPOINT"):
        arguments += ["--rdzv_backend", "c10d", "--rdzv_endpoint", os.environ["RDZV_ENDPOINT"],
                      "--rdzv_id", os.environ.get("RDZV_ID", "titanlite")]
    elif nnodes != "1":
        for name in ("NODE_RANK", "MASTER_ADDR"):
            if not os.environ.get(name):
                raise ConfigError(f"NNODES={nnodes} needs {name} (or RDZV_ENDPOINT for a c10d rendezvous)")
        arguments += ["--node_rank", os.environ["NODE_RANK"], "--master_addr", os.environ["MASTER_ADDR"],
                      "--master_port", os.environ.get("MASTER_PORT", "29500")]
    else:
        arguments += ["--standalone"]
    # torchrun's agent turns SIGTERM and SIGINT into SIGTERM for the workers and SIGKILL 30 s later;
    # forward_stop_signals handles those (and SIGUSR1) instead, so the agent keeps SIGHUP and SIGQUIT only.
    arguments += ["--signals_to_handle", "SIGHUP,SIGQUIT"]
    return arguments + ["--local-ranks-filter", os.environ.get("LOG_RANK", "0"), "--role", "rank", "--tee", "3",
                        *worker]


def shown_local_ranks() -> set[int]:
    return {int(rank) for rank in os.environ.get("LOG_RANK", "0").split(",") if rank.strip().isdigit()}


def root_cause_rank(failures: dict) -> int:
    """The rank whose failure ended the run, among torchrun's ProcessFailures (rank -> failure).

    When one rank fails, torchrun stops the others with SIGTERM (then SIGKILL after 30 s), and a
    peer waiting on a collective may crash on the broken connection first: those are collateral.
    The earliest failures are the candidates (a timestamp is the second torchrun noticed the exit,
    or the second the rank wrote its error file: within a second of the earliest counts as as
    early). Among them: a rank killed by a signal other than SIGTERM (kill -9, the kernel's OOM
    killer, a crash: torchrun sends none of those first), then one that exited with a titanlite
    line, then one that exited with another status, then one stopped by SIGTERM; then a rank whose
    output is on screen, then the lowest rank.
    """
    shown, earliest = shown_local_ranks(), min(failure.timestamp for failure in failures.values())

    def kind(failure) -> int:
        if failure.exitcode < 0:
            return 0 if -failure.exitcode != signal.SIGTERM else 3
        said_why = isinstance(failure.message, str) and failure.message.startswith("titanlite: ")
        return 1 if said_why else 2

    candidates = [rank for rank, failure in failures.items() if failure.timestamp <= earliest + 1]
    return min(candidates, key=lambda r: (kind(failures[r]), failures[r].local_rank not in shown, r))


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def exit_code_of_failure(error) -> int:
    """Report a torchrun ChildFailedError in titanlite's terms, naming its root cause (root_cause_rank);
    returns the exit code to use: the root cause's status, or 128 + the signal that killed it."""
    failures = error.failures
    rank = root_cause_rank(failures)
    failure = failures[rank]
    if failure.exitcode < 0:  # killed by a signal: no line of its own, whatever its output shows
        others = "; the other ranks were stopped" if len(failures) > 1 else ""
        print(f"titanlite: rank {rank} (pid {failure.pid}) was killed by {signal_name(-failure.exitcode)}{others}",
              file=sys.stderr)
        return 128 - failure.exitcode
    if failure.local_rank not in shown_local_ranks():
        message = failure.message if isinstance(failure.message, str) else ""
        if message.startswith("titanlite: "):  # the trainer's line, from report_to_launcher
            print(f"{message} (rank {rank})", file=sys.stderr)
        else:
            print(f"titanlite: rank {rank} exited with status {failure.exitcode}; run with "
                  f"LOG_RANK={failure.local_rank} to see its output", file=sys.stderr)
    return failure.exitcode


def run_torchrun(arguments: list[str], stop_grace_s: float | None = None) -> int:
    """torchrun in this process; returns the exit code (see the module docstring). stop_grace_s: how
    long the ranks may take to stop after SIGTERM/SIGINT/SIGUSR1 (default: TITANLITE_STOP_GRACE_S)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's agent logs every failed worker at ERROR level; exit_code_of_failure reports it instead.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    forward_stop_signals(stop_grace_seconds() if stop_grace_s is None else stop_grace_s)
    os.environ["TITANLITE_LAUNCHER_PID"] = str(os.getpid())  # the ranks' parent: see job/exits.py die_with_launcher
    try:
        run(parse_args(arguments))
    except ChildFailedError as error:
        return exit_code_of_failure(error)
    except SignalException as error:  # a signal before the workers started, or SIGHUP/SIGQUIT: torchrun stopped them
        print(f"titanlite: stopped by signal {error.sigval.name}", file=sys.stderr)
        return 128 + int(error.sigval)
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, rest = split_config_argument(argv, os.environ.get("CONFIG_FILE"))
        worker = ["-m", "titanlite.train", "--config", config, *rest]
        if any(flag in rest for flag in PASS_THROUGH_FLAGS):
            os.execve(sys.executable, [sys.executable, *worker], {**os.environ, "TITANLITE_PROG": launcher_name()})
        loaded = load_config(config, rest)  # fails fast: no torch imported yet
        nproc = positive_int("NGPU") if os.environ.get("NGPU") else max(1, visible_devices())
        # The layout and the batch against the world size, before seconds of torch start-up per process.
        nnodes = os.environ.get("NNODES", "1")
        if nnodes.isdigit():  # an elastic range (MIN:MAX) leaves the world size to the rendezvous
            gradient_accumulation_steps(loaded.training, data_parallel_shape(loaded.parallelism, nproc * int(nnodes)))
        arguments = torchrun_arguments(nproc, worker)
        stop_grace_s = stop_grace_seconds()
    except ConfigError as error:
        print(f"titanlite: config error: {error}", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    # Less fragmentation: without it the 7B FSDP 4 run reserved 77.5 GiB for 68 GiB allocated.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if nproc == 1 and os.environ.get("NNODES", "1") == "1" and not os.environ.get("RDZV_ENDPOINT"):
        os.execv(sys.executable, [sys.executable, *worker])  # one process: no torchrun needed
    sys.exit(run_torchrun(arguments, stop_grace_s))


if __name__ == "__main__":
    main()
