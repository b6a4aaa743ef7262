"""Configuration: the declared settings <- TOML file <- dotted command-line overrides, checked; then `resolve()`.

The fields, with their types, defaults, bounds and help, are declared in titanlite/config/settings.py;
this module fills them and checks every value against its declaration and the combinations that
cannot work.

Precedence is defaults < TOML < CLI (`--training.steps 20`; `--compile.enable` alone means true).
Every error is a `ConfigError` whose message names the key, the value and what is allowed; the
entry points print it on one line and exit with status 2. This module imports no torch, so a
config can be checked in a fraction of a second before any process starts.

titanlite/config/resolve.py turns a loaded config into the run it describes (every derived value, once).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any, get_type_hints

from titanlite.config.settings import Config, ConfigError, declared_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PACKAGE = Path(__file__).resolve().parent.parent
CONFIG_DIR = PACKAGE / "train_configs"  # where a wheel ships the recipes (pyproject.toml)
if not CONFIG_DIR.is_dir():  # a checkout or an editable install: the repository's train_configs/
    CONFIG_DIR = PACKAGE.parent / "train_configs"


# Keys a torchtitan or Megatron user may reach for first, with where the setting lives here.
FAMILIAR_KEYS = {
    "training.local_batch_size": "training.micro_batch_size",
    "training.global_batch_size": "training.global_batch_tokens (tokens, not sequences)",
    "training.max_norm": "training.grad_clip",
    "training.dataset": "data.source",
    "lr_scheduler.warmup_steps": "lr_schedule.warmup_tokens (tokens, not steps)",
    "lr_scheduler.decay_type": "lr_schedule.decay",
    "lr_scheduler.min_lr_factor": "lr_schedule.min_lr_ratio",
    "job.config_file": "--config FILE",
    "model.flavor": "the model fields of [model] (or a recipe: --config 7b_4k)",
    "activation_checkpoint.selective_ac_option": "activation_checkpoint.selective_blocks (0 = per op)",
    "parallelism.data_parallel_shard_degree": "parallelism.data_parallel_shard_degree",
}


def _unknown_key(dotted: str) -> ConfigError:
    known = [key for key, _, _ in declared_fields()]
    hint = FAMILIAR_KEYS.get(dotted) or next(iter(difflib.get_close_matches(dotted, known, n=1, cutoff=0.75)), None)
    section = dotted.partition(".")[0]
    sections = sorted({key.partition(".")[0] for key in known})
    if hint:
        return ConfigError(f"unknown key {dotted!r}: did you mean {hint}?")
    if section not in sections:
        return ConfigError(f"unknown config section {section!r}: valid sections are {sections}")
    keys = sorted(key.partition(".")[2] for key in known if key.startswith(section + "."))
    return ConfigError(f"unknown key {dotted!r}: valid keys in [{section}] are {keys}")


def _convert(key: str, raw: Any, target: type, from_cli: bool) -> Any:
    """Coerce a CLI string or a typed TOML value to the field's type, or raise a ConfigError naming the key."""
    if from_cli and target is not str:
        text = raw.strip()
        try:
            if target is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return text.lower() in ("true", "1")
            if target is int:  # "1e9" and "4096.0" are whole numbers; "1.5" is not
                return int(float(text)) if any(c in text.lower() for c in ".e") and float(text).is_integer() \
                    else int(text)
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected {target.__name__}") from None
    if target is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if target is int and isinstance(raw, float) and raw.is_integer():
        return int(raw)  # 1e12 in TOML is a float; a whole number is fine for an int field
    if not isinstance(raw, target) or (target is int and isinstance(raw, bool)):
        raise ConfigError(f"{key}={raw!r}: expected {target.__name__}, got {type(raw).__name__}")
    return raw


def _set(config: Config, dotted: str, raw: Any, from_cli: bool = False) -> None:
    section_name, _, key = dotted.partition(".")
    section = getattr(config, section_name, None) if key else None
    types = get_type_hints(type(section)) if dataclasses.is_dataclass(section) else {}
    if key not in types:
        raise _unknown_key(dotted)
    setattr(section, key, _convert(dotted, raw, types[key], from_cli))


def resolve_config_path(name_or_path: str) -> Path:
    """A path as given, else a name looked up in train_configs/ (with or without .toml)."""
    candidates = [Path(name_or_path), CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.toml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {name_or_path!r} not found (looked in . and {CONFIG_DIR})")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file at `path` (if any), then `--section.key value` overrides; validated."""
    config = Config()
    if path:
        toml_path = resolve_config_path(path)
        try:
            data = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{toml_path}: invalid TOML: {error}") from None
        except UnicodeDecodeError as error:  # TOML is UTF-8 by definition
            line = error.object[:error.start].count(b"\n") + 1
            raise ConfigError(f"{toml_path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} on line {line}): "
                              "save it as UTF-8") from None
        except OSError as error:
            raise ConfigError(f"{toml_path}: cannot be read ({error.strerror or error})") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{toml_path}: top-level key {section!r} must be a [section] table")
            for key, value in values.items():
                _set(config, f"{section}.{key}", value)
    for dotted, value in parse_overrides(overrides or []):
        _set(config, dotted, value, from_cli=True)
    validate(config)
    return config


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """['--a.b', '1', '--c.d=2', '--e.f'] -> [('a.b', '1'), ('c.d', '2'), ('e.f', 'true')].

    A flag with no value (the last argument, or followed by another --flag) is a boolean set to true.
    """
    pairs, index = [], 0
    while index < len(overrides):
        flag = overrides[index]
        if not flag.startswith("--") or "." not in flag:
            raise ConfigError(f"unexpected argument {flag!r}: overrides look like --section.key value")
        if "=" in flag:
            dotted, value = flag[2:].split("=", 1)
            index += 1
        elif index + 1 < len(overrides) and not overrides[index + 1].startswith("--"):
            dotted, value = flag[2:], overrides[index + 1]
            index += 2
        else:
            dotted, value = flag[2:], None
            index += 1
        if value is None:
            kind = next((kind for key, _, kind in declared_fields() if key == dotted), None)
            if kind is not bool:
                raise ConfigError(f"override {flag} has no value" if kind else str(_unknown_key(dotted)))
            value = "true"
        pairs.append((dotted, value))
    return pairs


def validate(config: Config) -> None:
    """Reject values that cannot work, before any process group or model exists."""
    for dotted, item, kind in declared_fields():
        section, key = dotted.split(".")
        value, rules = getattr(getattr(config, section), key), item.metadata
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"{dotted}={value}: must be a finite number")
        if rules["choices"] is not None and value not in rules["choices"]:
            raise ConfigError(f"{dotted}={value!r}: allowed values are {list(rules['choices'])}")
        for bound, fails, words in (("gt", lambda v, b: v <= b, "> {}"), ("ge", lambda v, b: v < b, ">= {}"),
                                    ("le", lambda v, b: v > b, "<= {}"), ("lt", lambda v, b: v >= b, "< {}")):
            if rules[bound] is not None and fails(value, rules[bound]):
                raise ConfigError(f"{dotted}={value}: must be {words.format(rules[bound])}")
    model = config.model
    head_dim = model.dim // model.n_heads
    if model.dim % model.n_heads:
        raise ConfigError(f"model.dim={model.dim}: must be divisible by model.n_heads={model.n_heads}")
    if head_dim % 2:
        raise ConfigError(f"model.dim/model.n_heads={head_dim}: RoPE needs an even head dim")
    if model.n_heads % model.n_kv_heads:
        raise ConfigError(f"model.n_kv_heads={model.n_kv_heads}: must divide model.n_heads={model.n_heads}")
    if model.rope_scaling == "yarn" and not model.rope_beta_slow < model.rope_beta_fast:
        raise ConfigError(f"model.rope_beta_slow={model.rope_beta_slow}, model.rope_beta_fast={model.rope_beta_fast}: "
                          "YaRN needs rope_beta_slow < rope_beta_fast")
    if model.rope_scaling == "llama3" and not model.rope_low_freq_factor < model.rope_high_freq_factor:
        raise ConfigError(f"model.rope_low_freq_factor={model.rope_low_freq_factor}, model.rope_high_freq_factor="
                          f"{model.rope_high_freq_factor}: llama3 needs rope_low_freq_factor < rope_high_freq_factor")
    if 0 < model.attention_head_dim < head_dim:
        raise ConfigError(f"model.attention_head_dim={model.attention_head_dim}: must be 0 (auto) or >= the head "
                          f"dim {head_dim}")
    _validate_tensor_parallel(config)
    if config.metrics.enable_wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("metrics.enable_wandb=true but wandb is not installed: pip install 'titanlite[wandb]' "
                          "or set metrics.enable_wandb=false")
    _validate_optimizer_and_float8(config)
    health, profiling = config.health, config.profiling
    if health.spike_min_history > health.spike_window:
        raise ConfigError(f"health.spike_min_history={health.spike_min_history}: must be <= health.spike_window="
                          f"{health.spike_window}")
    if profiling.profile_freq <= profiling.profile_warmup + profiling.profile_active:
        raise ConfigError(f"profiling.profile_freq={profiling.profile_freq}: must exceed profile_warmup "
                          f"{profiling.profile_warmup} + profile_active {profiling.profile_active}")


def _validate_tensor_parallel(config: Config) -> None:
    """Refuse a model that tensor_parallel_degree cannot split evenly (heads, FFN, vocabulary, sequence)."""
    tp, model = config.parallelism.tensor_parallel_degree, config.model
    vocab_key, vocab = ("model.vocab_size", model.vocab_size) if model.vocab_size else (
        "tokenizer.vocab_multiple", config.tokenizer.vocab_multiple)
    splits = [("model.n_heads", model.n_heads, "query heads"), ("model.n_kv_heads", model.n_kv_heads, "KV heads"),
              ("model.intermediate_size", model.intermediate_size, "FFN columns"),
              (vocab_key, vocab, "vocabulary rows"), ("training.seq_len", config.training.seq_len,
                                                      "sequence-parallel positions")]
    for key, value, what in splits:
        if value % tp:
            raise ConfigError(f"{key}={value}: tensor_parallel_degree={tp} must divide it (TP splits the {what}); "
                              f"use a TP degree that divides {value}")


def _validate_optimizer_and_float8(config: Config) -> None:
    """Combinations of [optimizer], [parallelism] and [float8] that cannot work, whatever the device."""
    opt = config.optimizer
    if opt.name != "adamw" and opt.implementation != "auto":
        raise ConfigError(f"optimizer.implementation={opt.implementation!r} applies to adamw only: remove it for "
                          f"optimizer.name={opt.name!r}")
    if opt.cpu_offload and opt.name != "adamw":
        raise ConfigError(f"optimizer.cpu_offload=true offloads torch's AdamW: set optimizer.name=adamw (or "
                          f"cpu_offload=false to keep {opt.name} on the GPU)")
    if opt.cpu_offload and config.parallelism.fsdp_cpu_offload:
        raise ConfigError("optimizer.cpu_offload and parallelism.fsdp_cpu_offload are both true: use one (FSDP's "
                          "offloads parameters and gradients too)")
    if any(not part.strip() for part in config.float8.exclude.split(",")) and config.float8.exclude.strip():
        raise ConfigError(f"float8.exclude={config.float8.exclude!r}: an empty name fragment between commas")


def config_from_dict(record: dict) -> Config:
    """The Config a run folder's config.json or a checkpoint's meta.json recorded (Config.to_dict() or
    Run.to_dict()); settings added since keep today's defaults, settings since removed are ignored."""
    config = Config()
    for section in dataclasses.fields(Config):
        values = getattr(config, section.name)
        for key, value in record.get(section.name, {}).items():
            if key in values.__dataclass_fields__:
                setattr(values, key, value)
    validate(config)
    return config


def config_differences(saved: dict, current: dict) -> list[str]:
    """'section.key: saved -> current' for every setting that differs between two config dicts
    (Config.to_dict() or Run.to_dict()); keys one side lacks are listed too. Derived values are left
    out: they follow from the settings."""
    differences = []
    for section in sorted(set(saved) | set(current)):
        if section == "derived" or not isinstance(saved.get(section, {}), dict):
            continue
        before, after = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(before) | set(after)):
            if before.get(key, "<unset>") != after.get(key, "<unset>"):
                differences.append(f"{section}.{key}: {before.get(key, '<unset>')!r} -> {after.get(key, '<unset>')!r}")
    return differences


