"""Config: TOML + dotted overrides, every error class, derived values, the CLI's exit code."""

import subprocess
import sys

import pytest

from titanlite.config.load import load_config
from titanlite.config.resolve import render, resolve
from titanlite.config.settings import ConfigError


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_defaults_toml_then_cli_precedence(tmp_path):
    path = write(tmp_path, "[optimizer]\nlr = 1e-3\n[training]\nsteps = 7\n")
    config = load_config(path, ["--optimizer.lr", "2e-4", "--metrics.log_freq=3"])
    assert config.optimizer.lr == 2e-4  # CLI beats TOML
    assert config.training.steps == 7  # TOML beats default
    assert config.metrics.log_freq == 3
    assert config.optimizer.beta2 == 0.95  # default untouched


def test_named_config_resolves_in_train_configs():
    config = load_config("debug_model")
    assert config.model.dim == 256 and config.training.seq_len == 256


@pytest.mark.parametrize("overrides, fragment", [
    (["--nosuch.key", "1"], "unknown config section 'nosuch'"),
    (["--training.nosuch", "1"], "unknown key 'training.nosuch'"),
    (["--training.steps", "ten"], "training.steps='ten': expected int"),
    (["--training.steps", "1.5"], "training.steps='1.5': expected int"),
    (["--compile.enable", "maybe"], "compile.enable='maybe': expected bool"),
    (["--optimizer.lr", "-1e-4"], "optimizer.lr=-0.0001: must be > 0"),
    (["--optimizer.beta2", "1.5"], "optimizer.beta2=1.5: must be < 1"),
    (["--optimizer.beta1", "1"], "optimizer.beta1=1.0: must be < 1"),  # torch's AdamW refuses it
    (["--activation_checkpoint.mode", "some"], "allowed values are ['none', 'full', 'selective']"),
    (["--model.n_kv_heads", "3"], "model.n_kv_heads=3: must divide model.n_heads=8"),
    (["--training.steps"], "has no value"),
    (["--training.local_batch_size", "4"], "did you mean training.micro_batch_size?"),
    (["--lr_scheduler.warmup_steps", "4"], "did you mean lr_schedule.warmup_tokens (tokens, not steps)?"),
    (["--training.max_norm", "1"], "did you mean training.grad_clip?"),
    (["--job.config_file", "x.toml"], "did you mean --config FILE?"),
    (["--training.micro_batchsize", "4"], "did you mean training.micro_batch_size?"),
    (["--optimizer.lr", "nan"], "optimizer.lr=nan: must be a finite number"),
    (["--training.grad_clip", "nan"], "training.grad_clip=nan: must be a finite number"),
    (["--training.grad_clip", "inf"], "training.grad_clip=inf: must be a finite number"),
    (["--data.default_num_documents", "-5"], "data.default_num_documents=-5: must be > 0"),
    (["--training.seed", "-1"], "training.seed=-1: must be >= 0"),  # numpy's data order takes no negative seed
    (["positional"], "unexpected argument 'positional'"),
])
def test_bad_overrides_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=None) as error:
        load_config("debug_model", overrides)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_toml_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'model.dimension'"):
        load_config(write(tmp_path, "[model]\ndimension = 3\n[training]\nsteps = 1\n"))
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[model\n"))
    with pytest.raises(ConfigError, match="expected int, got str"):
        load_config(write(tmp_path, "[model]\ndim = '3'\n[training]\nsteps = 1\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config")
    (tmp_path / "latin1.toml").write_bytes(b'[job]\ndescription = "caf\xff"\n')
    with pytest.raises(ConfigError, match=r"latin1.toml: not UTF-8 text \(byte 0xff on line 2\): save it as UTF-8$"):
        load_config(str(tmp_path / "latin1.toml"))


def test_toml_float_for_int_field_is_accepted_when_whole(tmp_path):
    config = load_config(write(tmp_path, "[training]\ntotal_tokens = 1e12\n"))
    assert config.training.total_tokens == 10 ** 12 and isinstance(config.training.total_tokens, int)


def test_derived_values_follow_the_corrected_formula():
    # SPEC: A = GB_tok / (micro_batch x seq_len x DP), DP excludes the TP ranks.
    config = load_config("debug_model", [
        "--training.seq_len", "4096", "--training.micro_batch_size", "4", "--training.global_batch_tokens", "4194304",
        "--training.total_tokens", "1000000000000", "--training.steps", "0", "--lr_schedule.warmup_tokens", "3000000000",
        "--parallelism.tensor_parallel_degree", "8", "--model.n_kv_heads", "8"])
    derived = resolve(config, world_size=64, tokenizer_vocab_size=2048)
    assert derived.layout.data_parallel_degree == 8
    assert derived.grad_accum_steps == 4194304 // (4 * 4096 * 8) == 32
    assert derived.total_steps == 238419  # 1e12 / 4194304 = 238,418.58
    assert derived.warmup_steps == 715  # 3e9 / 4194304 = 715.26, to the nearest step as SPEC says
    assert derived.tokens_per_step == 4194304


def test_indivisible_global_batch_and_bad_mesh_are_rejected():
    config = load_config("debug_model", ["--training.global_batch_tokens", "10000"])
    with pytest.raises(ConfigError, match="global_batch_tokens=10000: must be a multiple of"):
        resolve(config, world_size=1, tokenizer_vocab_size=2048)
    config = load_config("debug_model", ["--parallelism.tensor_parallel_degree", "4"])
    with pytest.raises(ConfigError, match="world size 6 is not divisible"):
        resolve(config, world_size=6, tokenizer_vocab_size=2048)
    config = load_config("debug_model", ["--parallelism.data_parallel_shard_degree", "3"])
    with pytest.raises(ConfigError, match="!= world size 4"):
        resolve(config, world_size=4, tokenizer_vocab_size=2048)


def test_render_contains_config_and_derived():
    config = load_config("debug_model")
    text = render(resolve(config, 1, 2048))
    assert "[training]" in text and "grad_accum_steps = 4" in text and "total_steps = 80" in text


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "titanlite.train", *args], capture_output=True, text=True, timeout=120)


def test_cli_print_config_and_error_exit_code():
    printed = run_cli("--config", "debug_model", "--print-config", "--training.steps", "5")
    assert printed.returncode == 0, printed.stderr
    assert "steps = 5" in printed.stdout and "# grad_accum_steps = 4" in printed.stdout
    failed = run_cli("--config", "debug_model", "--optimizer.lr", "-1")
    assert failed.returncode == 2
    assert failed.stderr.strip() == "titanlite: config error: optimizer.lr=-1.0: must be > 0"
    assert "Traceback" not in failed.stderr


@pytest.mark.parametrize("doc", ["docs/config.md", "docs/architecture.md"])
def test_generated_docs_are_current(doc):
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("generate_docs", root / "scripts" / "generate_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.current(doc) == (root / doc).read_text(), "run: python scripts/generate_docs.py --write"


@pytest.mark.parametrize("override, message", [
    (["--data.source", "/nonexistent/data"], "titanlite: data error: data.source=/nonexistent/data: no such file"),
    (["--tokenizer.path", "/nonexistent.model"], "titanlite: tokenizer error: tokenizer file /nonexistent.model"),
])
def test_cli_bad_data_and_tokenizer_exit_2_with_one_line(tmp_path, override, message):
    failed = run_cli("--config", "debug_model", "--training.steps", "1", "--job.dump_folder", str(tmp_path),
                     "--metrics.enable_tensorboard", "false", *override)
    assert failed.returncode == 2
    assert "Traceback" not in failed.stderr
    assert any(line.startswith(message) for line in failed.stderr.splitlines()), failed.stderr


def test_bare_boolean_flags_mean_true():
    config = load_config("debug_model", ["--checkpoint.enable", "--training.steps", "10", "--compile.enable"])
    assert config.checkpoint.enable is True and config.compile.enable is True and config.training.steps == 10
    with pytest.raises(ConfigError, match="override --training.steps has no value"):
        load_config("debug_model", ["--training.steps", "--checkpoint.enable"])


def test_help_lists_every_setting():
    import dataclasses

    from titanlite.config.settings import Config
    printed = run_cli("--help")
    assert printed.returncode == 0
    keys = [f"--{section.name}.{item.name}" for section in dataclasses.fields(Config)
            for item in dataclasses.fields(section.default_factory)]
    assert len(keys) > 90
    missing = [key for key in keys if key not in printed.stdout]
    assert not missing


def test_resolve_leaves_the_loaded_config_unchanged_and_makes_every_auto_concrete():
    config = load_config("debug_model", ["--model.attention_head_dim", "0"])
    before = config.to_dict()
    probed = []
    run = resolve(config, world_size=1, tokenizer_vocab_size=2056,
                  probe_head_dim=lambda model, tp, dtype: probed.append((model.dim, tp, dtype)) or 40)
    assert probed == [(256, 1, "float32")]  # the probe sees the model, the TP degree and the compute dtype
    assert config.to_dict() == before  # the loaded config is never mutated
    assert run.config.model.vocab_size == 2176  # 2056 padded to a multiple of 128
    assert run.config.model.attention_head_dim == 40
    assert resolve(config, 1, 2056).config.model.attention_head_dim == 32  # 0 = the true head dim (256 / 8)
    assert run.to_dict()["derived"]["grad_accum_steps"] == 4
    with pytest.raises(ConfigError, match="model.vocab_size=1024 is smaller than the tokenizer's 2056 ids"):
        resolve(load_config("debug_model", ["--model.vocab_size", "1024"]), 1, 2056)


def test_a_step_budget_is_needed_to_train_not_to_load():
    config = load_config(None)  # tools (plan, convert, prepare) load configs without a step budget
    with pytest.raises(ConfigError, match="training.total_tokens=0 and training.steps=0"):
        resolve(config, 1, 2048)


def test_padded_vocab_size():
    from titanlite.config.resolve import padded_vocab_size
    assert padded_vocab_size(2008, 128) == 2048
    assert padded_vocab_size(128256, 128) == 128256
    assert padded_vocab_size(1, 64) == 64
    assert padded_vocab_size(100277, 8) == 100280
