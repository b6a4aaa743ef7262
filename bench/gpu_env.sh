# The GPU machine's environment for a benchmark session (source it from the repository root): the
# carried wheels (.whl/: datasets, torchao, torchtitan, ...) installed into /tmp/site, unbuffered
# Python, and bench/gpu_case.sh's results file under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > /tmp/pip.log 2>&1 || { tail -5 /tmp/pip.log; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
export RESULTS=$OUT/cases.jsonl
