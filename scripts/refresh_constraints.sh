#!/usr/bin/env bash
# Rewrites constraints.txt from the newest releases: a fresh venv, the CPU torch, the project with its
# test extras, pip freeze. Run the test suite against the result before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q -e ".[dev]"
{
  sed -n '1,5p' constraints.txt  # the header
  "$venv/bin/pip" freeze --exclude-editable | grep -v -i -e '^torch==' | sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -c '==' constraints.txt) pins; now run: bash .ci/run"
