#!/usr/bin/env bash
# ./run_train.sh [--config NAME_OR_PATH] [--section.key value ...]      (or CONFIG_FILE=path ./run_train.sh)
#
# A thin wrapper around the launcher, titanlite/launch.py (installed as `titanlite-run`): it checks
# the config in well under a second, then runs one process directly or torchrun for several, and
# exits with titanlite's code (2 bad input, 1 checkpoint or memory, 3 health stop). Its docstring
# lists the environment: NGPU, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, RDZV_ENDPOINT, RDZV_ID,
# LOG_RANK. Paths are relative to the folder you launch from; the code is the titanlite next to
# this script (PYTHONPATH), so a checkout runs its own code even when another one is pip-installed.
# PYTHON picks the interpreter (default: python3 on PATH).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export TITANLITE_PROG="${TITANLITE_PROG:-$0}"  # the usage line of --help names this script as it was typed
exec "${PYTHON:-python3}" -m titanlite.launch "$@"
