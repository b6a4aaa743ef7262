"""Run finished multi-process jobs many times and count how they exit (issue 19, item 1).

    python scripts/stress_exits.py --repeat 20                       # every case, 20 times each
    python scripts/stress_exits.py --repeat 5 --cases tp2_sync resume_1_to_2 --keep runs/stress

Each case is a short debug-model run through ./run_train.sh with NGPU=2 (CPU, gloo) that saves a
checkpoint at its last step. A finished run must exit 0 and never print "terminate called" (a
C++ std::thread destroyed while still joinable aborts the process at interpreter exit: SIGABRT,
exit code 134 through the launcher). Prints one line per run and a table; exits 1 unless every
run of every case exited 0 cleanly. Output of failed runs is kept under --keep (default: a
temporary folder, printed).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHORT_RUN = ["--config", "debug_model", "--training.global_batch_tokens", "4096", "--lr_schedule.warmup_tokens",
             "8192", "--training.mixed_precision", "fp32", "--training.device", "cpu", "--checkpoint.enable", "true",
             "--metrics.enable_tensorboard", "false"]
TP2 = ["--parallelism.tensor_parallel_degree", "2"]
FSDP2 = ["--parallelism.data_parallel_shard_degree", "2"]
ASYNC = ["--checkpoint.async_mode", "async"]
# case name -> the launches it makes, in order: (NGPU, extra arguments); all share one dump folder.
CASES = {
    "tp2_sync": [(2, TP2 + ["--training.steps", "6", "--checkpoint.interval", "6"])],
    "fsdp2_sync": [(2, FSDP2 + ["--training.steps", "6", "--checkpoint.interval", "3"])],
    "tp2_async": [(2, TP2 + ASYNC + ["--training.steps", "6", "--checkpoint.interval", "3"])],
    "fsdp2_async": [(2, FSDP2 + ASYNC + ["--training.steps", "6", "--checkpoint.interval", "3"])],
    "resume_1_to_2": [(1, ["--training.steps", "3", "--checkpoint.interval", "3"]),
                      (2, FSDP2 + ["--training.steps", "6", "--checkpoint.interval", "3"])],
}


def launch(ngpu: int, arguments: list[str], dump_folder: Path, timeout: int) -> tuple[int, str]:
    """./run_train.sh once; (exit code, stdout + stderr). A run past `timeout` counts as -9."""
    environment = {key: value for key, value in os.environ.items() if key not in ("CONFIG_FILE", "LOG_RANK")}
    environment.update(NGPU=str(ngpu), LOG_RANK="0,1")  # both ranks' output: an abort on rank 1 shows too
    command = [str(REPO / "run_train.sh"), *SHORT_RUN, *arguments, "--job.dump_folder", str(dump_folder)]
    try:
        result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        return -9, f"{error.stdout or ''}{error.stderr or ''}\n(timed out after {timeout} s)"
    return result.returncode, result.stdout + result.stderr


def run_case(name: str, keep: Path, index: int, timeout: int) -> tuple[int, bool, float]:
    """One repetition of a case: (exit code of its first failing launch, or 0; aborted; seconds)."""
    dump_folder = keep / f"{name}-{index:03d}"
    shutil.rmtree(dump_folder, ignore_errors=True)
    started, code, aborted, outputs = time.monotonic(), 0, False, []
    for ngpu, arguments in CASES[name]:
        code, output = launch(ngpu, arguments, dump_folder, timeout)
        outputs.append(output)
        aborted = aborted or "terminate called" in output
        if code != 0:
            break
    seconds = time.monotonic() - started
    if code == 0 and not aborted:
        shutil.rmtree(dump_folder, ignore_errors=True)  # keep only what a person needs to read
    else:
        dump_folder.mkdir(parents=True, exist_ok=True)
        (dump_folder / "launcher_output.txt").write_text("\n----- next launch -----\n".join(outputs))
    return code, aborted, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20, help="repetitions of each case")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--keep", type=Path, default=None, help="folder for the runs (failed ones are kept)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds one launch may take")
    args = parser.parse_args()
    keep = args.keep or Path(tempfile.mkdtemp(prefix="stress_exits_"))
    keep.mkdir(parents=True, exist_ok=True)
    codes: dict[str, collections.Counter] = {name: collections.Counter() for name in args.cases}
    aborts, clean = collections.Counter(), collections.Counter()
    for index in range(args.repeat):  # interleaved: a slow spell of the machine hits every case alike
        for name in args.cases:
            code, aborted, seconds = run_case(name, keep, index, args.timeout)
            codes[name][code] += 1
            aborts[name] += aborted
            clean[name] += code == 0 and not aborted
            print(f"{name} #{index + 1}: exit {code}{'  terminate called' if aborted else ''}  ({seconds:.0f} s)",
                  flush=True)
    print(f"\n{'case':<16} clean exits   exit codes         'terminate called'   (failed runs kept in {keep})")
    for name in args.cases:
        print(f"{name:<16} {clean[name]:>3}/{args.repeat:<8} {dict(codes[name])!s:<18} {aborts[name]}")
    raise SystemExit(0 if all(clean[name] == args.repeat for name in args.cases) else 1)


if __name__ == "__main__":
    main()
