"""README's "Your own data, end to end", run as written on real text nobody here wrote.

The commands are read from README's code block (so a README that drifts from the code fails here),
scaled down (vocabulary, context, steps, intervals) and run in order from a folder holding `my_text/`
and `my_held_out/`: Python's own documentation topics (pydoc_data, shipped with every Python), 71
documents to train on and 8 held out. The run is stopped with Ctrl-C (SIGINT) after its first
checkpoint and the same command resumes it, as README says; then diagnose, generate, and an export
that transformers loads and whose greedy tokens must equal titanlite's.
"""

import importlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent

# README's sizes are for a real run; these keep the same commands to about a minute on one CPU core.
SCALE = {"--vocab-size": "600", "--seq-len": "64", "--training.seq_len": "64", "--validation.interval": "4",
         "--checkpoint.interval": "4", "--training.steps": "12"}
STEPS = 12
# Added to the training command only: a model and batch small enough for the CPU (README trains the debug model).
SMALL_RUN = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
             "--model.intermediate_size", "128", "--training.global_batch_tokens", "512",
             "--training.micro_batch_size", "8", "--lr_schedule.warmup_tokens", "1024", "--validation.steps", "2",
             "--metrics.log_freq", "1", "--training.device", "cpu", "--optimizer.lr", "1e-2"]


def readme_commands() -> list[list[str]]:
    """The own-data section's bash block: one argument list per command (continuations joined, comments dropped)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own data, end to end"):]
    block = section[section.index("```bash\n") + len("```bash\n"):section.index("\n```", section.index("```bash"))]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip() and
            not line.lstrip().startswith("#")]


def scaled(command: list[str]) -> list[str]:
    """README's command with SCALE's values, and the final step's checkpoint instead of step-00001000."""
    out = list(command)
    for index, argument in enumerate(command[:-1]):
        if argument in SCALE:
            out[index + 1] = SCALE[argument]
    return [re.sub(r"step-\d{8}", f"step-{STEPS:08d}", argument) for argument in out]


def run_in_process(command: list[str], capsys) -> str:
    """`python -m titanlite.X ...` and `python scripts/X.py ...` through their main(argv); returns stdout."""
    assert command[0] == "python", command
    if command[1] == "-m":
        module = importlib.import_module(command[2])
        arguments = command[3:]
    else:
        spec = importlib.util.spec_from_file_location(Path(command[1]).stem, REPO / command[1])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        arguments = command[2:]
    capsys.readouterr()
    module.main(arguments)
    return capsys.readouterr().out


def write_documents(folder: Path) -> None:
    """Python's documentation topics as .jsonl: every tenth held out."""
    import pydoc_data.topics

    (folder / "my_text").mkdir()
    (folder / "my_held_out").mkdir()
    topics = sorted(pydoc_data.topics.topics.items())
    for name, keep in (("my_text", lambda i: i % 10), ("my_held_out", lambda i: not i % 10)):
        rows = [json.dumps({"text": text}) for i, (_, text) in enumerate(topics) if keep(i)]
        (folder / name / "topics.jsonl").write_text("\n".join(rows) + "\n")


def train_until_first_checkpoint_then_interrupt(command: list[str], cwd: Path, environment: dict) -> str:
    """Run the training command and press Ctrl-C once its first checkpoint is saved; its output."""
    process = subprocess.Popen(command, cwd=cwd, env=environment, stderr=subprocess.STDOUT, stdout=subprocess.PIPE,
                               text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if "checkpoint: saved step" in line:
            process.send_signal(signal.SIGINT)  # run_train.sh execs the launcher, which execs the trainer: one pid
            break
    output.append(process.communicate(timeout=120)[0])
    assert process.returncode != 0, "".join(output)  # stopped before the end, not finished
    return "".join(output)


@pytest.mark.slow
def test_readme_own_data_section_end_to_end(tmp_path, monkeypatch, capsys):
    commands = [scaled(command) for command in readme_commands()]
    names = [" ".join(command[:3]) for command in commands]
    assert names == ["python scripts/train_tokenizer.py --files", "python -m titanlite.prepare",
                     "python -m titanlite.prepare", "./run_train.sh --config debug_model",
                     "python -m titanlite.diagnose", "python -m titanlite.generate", "python -m titanlite.convert"], names
    for flag in SCALE:  # each scaled value is in README: nothing silently runs at full size
        assert any(flag in command for command in commands), flag
    write_documents(tmp_path)
    monkeypatch.chdir(tmp_path)
    tokenize, prepare_train, prepare_val, train, diagnose, generate, to_hf = commands

    # 1-2: a tokenizer trained on the text; prepared shards, the held-out ones apart
    run_in_process(tokenize, capsys)
    assert json.loads((tmp_path / "my_tokenizer" / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert "prepared 71 documents" in run_in_process(prepare_train, capsys)
    assert "prepared 8 documents" in run_in_process(prepare_val, capsys)

    # 3: train with validation; Ctrl-C after the first checkpoint; the same command again resumes
    environment = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",  # its lines as they come
                   "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    environment.pop("NGPU", None)
    command = [str(REPO / "run_train.sh"), *train[1:], *SMALL_RUN]
    interrupted = train_until_first_checkpoint_then_interrupt(command, tmp_path, environment)
    saved = int(re.findall(r"checkpoint: saved step (\d+)", interrupted)[-1])
    resumed = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f"checkpoint: loaded outputs/mine/checkpoint/step-{saved:08d}" in log, log[-3000:]
    records = [json.loads(line) for line in (tmp_path / "outputs/mine/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["step"] > saved] == list(range(saved + 1, STEPS + 1))
    evaluated = [r["step"] for r in records if "val_loss" in r]
    assert {4, 8, 12} <= set(evaluated)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5  # it learned something from the text

    # diagnose reads the run
    assert "outputs/mine:" in run_in_process(diagnose, capsys)

    # 4: generate (greedy), export, and transformers computes the same tokens
    completion = run_in_process(generate, capsys).removesuffix("\n")
    ids = json.loads(run_in_process([*generate, "--json"], capsys))
    assert ids["completion"] == completion and ids["stop_reason"] in ("eos", "max_new_tokens")
    run_in_process(to_hf, capsys)
    hf_out = tmp_path / to_hf[-1]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_out), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_out))
    prompt = generate[generate.index("--prompt") + 1]
    assert [tokenizer.eos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)] == ids["prompt_ids"]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ids["prompt_ids"]]), max_new_tokens=64, do_sample=False,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    new = greedy[0, len(ids["prompt_ids"]):].tolist()
    if new and new[-1] == tokenizer.eos_token_id:
        new = new[:-1]
    assert new == ids["completion_ids"]
    assert tokenizer.decode(new) == completion
