"""Checkpoint conversion: to and from Hugging Face Llama format, and seed checkpoints.

    python -m titanlite.convert to-hf   CHECKPOINT OUT_DIR [--dtype bfloat16] [--tokenizer PATH] [--load-unverified]
    python -m titanlite.convert from-hf HF_DIR OUT_FOLDER [--config NAME] [--overwrite] [--section.key value ...]
    python -m titanlite.convert seed    OUT_FOLDER --config NAME [--overwrite] [--section.key value ...]

to-hf writes what `LlamaForCausalLM` and `AutoTokenizer.from_pretrained` load: config.json (both
RoPE layouts, bos/eos ids; titanlite/checkpoint/hf_config.py), generation_config.json, safetensors (sharded
with model.safetensors.index.json when large) with HF parameter names, and the tokenizer as
tokenizer.json + tokenizer_config.json (titanlite/data/hf_tokenizer.py). from-hf and seed write a
model-only titanlite checkpoint OUT_FOLDER/step-00000000 for `checkpoint.initial_load_path`;
from-hf also points tokenizer.path at the folder's tokenizer.json when there is one. A seed
checkpoint is initialized by one process on the CPU, so every parallel layout starts from the
same weights.

The weights' names and RoPE layout: titanlite/checkpoint/hf.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from titanlite.checkpoint.hf import ConvertError, from_hf_state, to_hf_state
from titanlite.checkpoint.folders import step_folder
from titanlite.checkpoint.hf_config import HFConfigError, apply_hf_config, hf_config
from titanlite.checkpoint.storage import CheckpointError
from titanlite.checkpoint.weights import load_model_weights, save_model_checkpoint
from titanlite.config.load import config_from_dict, load_config, validate
from titanlite.config.resolve import concrete_config
from titanlite.config.settings import Config, ConfigError
from titanlite.data.hf_tokenizer import write_hf_tokenizer
from titanlite.data.tokenizer import TokenizerError, build_tokenizer
from titanlite.job.folder import why_not_writable
from titanlite.model.transformer import build_model


def check_out_folder(folder: Path, key: str) -> None:
    """Create `folder` if needed, or raise a ConvertError saying why it cannot hold the output
    (a file in the way, read-only storage). key: the argument, for the message."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConvertError(f"{key} {folder} is a file, not a folder: choose another path")
    reason = why_not_writable(folder)
    if reason:
        raise ConvertError(f"{key} {folder} is not writable ({reason}): choose another folder or fix its permissions")


def refuse_existing(out_folder: Path, overwrite: bool) -> None:
    """An earlier seed or import in out_folder is replaced only on request: it may be the one a run started from."""
    existing = step_folder(out_folder, 0)
    if existing.exists() and not overwrite:
        raise ConvertError(f"{existing} already exists: pass --overwrite to replace it, or choose another OUT_FOLDER")


def _give_normal_permissions(paths) -> None:
    """safetensors writes through a private temporary file (mode 0600): give the files the mode any
    other new file gets (0666 less the umask), so others on a shared filesystem can read them."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)


def export_to_hf(checkpoint: Path, out_dir: Path, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = 5 * 2**30, tokenizer_path: str | None = None,
                 load_unverified: bool = False) -> Path:
    """Write `checkpoint` (any complete titanlite checkpoint) as an HF Llama folder with its tokenizer.

    The tokenizer is the checkpoint's tokenizer.path unless `tokenizer_path` is given.
    load_unverified: accept a checkpoint without checksums.
    """
    weights, meta = load_model_weights(checkpoint, load_unverified)
    config = config_from_dict(meta["config"])
    path = tokenizer_path or config.tokenizer.path
    try:
        tokenizer = build_tokenizer(path)
    except TokenizerError as error:
        raise ConvertError(f"{error} (the checkpoint's tokenizer; to-hf --tokenizer PATH names another copy "
                           "of it)") from None
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConvertError(f"tokenizer {path} has {tokenizer.vocab_size} ids, more than the model's vocab_size "
                           f"{config.model.vocab_size}: not the tokenizer this model was trained with")
    state = to_hf_state(weights, config.model)
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
    try:  # before any file is written: a config HF cannot state leaves no half-written folder
        hf = hf_config(config, tokenizer.bos_id, tokenizer.eos_id, dtype_name)
    except HFConfigError as error:
        raise ConvertError(f"{checkpoint}: {error}") from None
    out_dir = Path(out_dir)
    check_out_folder(out_dir, "OUT_DIR")
    try:
        save_torch_state_dict(state, out_dir, max_shard_size=max_shard_bytes, metadata={"format": "pt"})
        _give_normal_permissions(out_dir.glob("model*.safetensors"))
        (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
        (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
        write_hf_tokenizer(tokenizer.byte_pair_encoding(), out_dir,
                           model_max_length=max(config.training.seq_len, hf["max_position_embeddings"]))
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as a SafetensorError
        reason = error.strerror if isinstance(error, OSError) else str(error).rpartition("I/O error: ")[2]
        raise ConvertError(f"cannot write the export to {out_dir} ({reason}): its files are incomplete; free space "
                           "or choose another OUT_DIR, then convert again") from None
    return out_dir


def read_hf_folder(hf_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and every tensor of an HF folder (one safetensors file, or the shards its index names)."""
    hf_dir = Path(hf_dir)
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
        index = hf_dir / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                 else ["model.safetensors"])
    except (OSError, ValueError, KeyError) as error:
        raise ConvertError(f"{hf_dir}: cannot read config.json or model.safetensors.index.json ({error})") from None
    tensors = {}
    for name in files:
        if not (hf_dir / name).is_file():
            raise ConvertError(f"{hf_dir / name}: missing (only safetensors checkpoints convert)")
        try:
            tensors.update(load_file(hf_dir / name))
        except SafetensorError as error:
            raise ConvertError(f"{hf_dir / name}: not a readable safetensors file ({error})") from None
    return hf, tensors


def import_from_hf(hf_dir: Path, out_folder: Path, config: Config, overwrite: bool = False) -> Path:
    """A model-only titanlite checkpoint out_folder/step-00000000 from an HF Llama folder.

    tokenizer.path: kept if set; else the folder's tokenizer.json (refused if titanlite cannot run it).
    An existing out_folder/step-00000000 is refused unless `overwrite`.
    """
    hf_dir = Path(hf_dir)
    refuse_existing(out_folder, overwrite)
    hf, tensors = read_hf_folder(hf_dir)
    try:
        apply_hf_config(hf, config)
        validate(config)  # the model as config.json states it, with this command's other settings
    except (HFConfigError, ConfigError) as error:
        raise ConvertError(f"{hf_dir / 'config.json'}: {error}") from None
    if config.tokenizer.path == "default":
        if (hf_dir / "tokenizer.json").is_file():
            config.tokenizer.path = str((hf_dir / "tokenizer.json").resolve())
        else:
            print(f"titanlite.convert: warning: {hf_dir} has no tokenizer.json; the checkpoint records "
                  "tokenizer.path=default (pass --tokenizer.path for the model's own tokenizer)", file=sys.stderr)
    try:
        tokenizer = build_tokenizer(config.tokenizer.path)
    except TokenizerError as error:
        raise ConvertError(f"{error} (pass --tokenizer.path to choose the tokenizer)") from None
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConvertError(f"tokenizer.path={config.tokenizer.path} has {tokenizer.vocab_size} ids, more than "
                           f"vocab_size={config.model.vocab_size} in {hf_dir / 'config.json'}: pass --tokenizer.path")
    weights = from_hf_state(tensors, config.model, bool(hf.get("tie_word_embeddings")), hf_dir)
    check_out_folder(out_folder, "OUT_FOLDER")
    return save_model_checkpoint(weights, out_folder, 0, config)


def write_seed_checkpoint(config: Config, out_folder: Path, overwrite: bool = False) -> Path:
    """Initialize the full model on the CPU in this one process and save it as step 0 (model only).
    An existing out_folder/step-00000000 is refused unless `overwrite`."""
    refuse_existing(out_folder, overwrite)
    check_out_folder(out_folder, "OUT_FOLDER")
    config = concrete_config(config, build_tokenizer(config.tokenizer.path).vocab_size)
    model = build_model(config.model, config.training.seq_len, device="cpu")
    model.init_weights(seed=config.training.seed)
    return save_model_checkpoint(model.state_dict(), out_folder, 0, config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titanlite.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("to-hf", help="titanlite checkpoint -> HF Llama folder")
    to_hf.add_argument("checkpoint", type=Path)
    to_hf.add_argument("out_dir", type=Path)
    to_hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="cast the weights (default: keep the checkpoint's dtype, a bitwise export)")
    to_hf.add_argument("--tokenizer", default=None,
                       help="the tokenizer to export (default: the checkpoint's tokenizer.path)")
    to_hf.add_argument("--load-unverified", action="store_true",
                       help="load a checkpoint whose meta.json has no checksums (its data unverified)")
    from_hf = commands.add_parser("from-hf", help="HF Llama folder -> model-only titanlite checkpoint")
    from_hf.add_argument("hf_dir", type=Path)
    from_hf.add_argument("out_folder", type=Path)
    seed = commands.add_parser("seed", help="seed checkpoint: the initial weights, made by one process")
    seed.add_argument("out_folder", type=Path)
    for command in (from_hf, seed):
        command.add_argument("--config", default=None, help="TOML file or name in train_configs/")
        command.add_argument("--overwrite", action="store_true",
                             help="replace the step-00000000 checkpoint already in OUT_FOLDER")
    args, overrides = parser.parse_known_args(argv)
    if args.command == "to-hf" and overrides:  # config overrides are for from-hf and seed only
        parser.error(f"to-hf: unrecognized arguments: {' '.join(overrides)}")
    try:
        if args.command == "to-hf":
            out = export_to_hf(args.checkpoint, args.out_dir, getattr(torch, args.dtype) if args.dtype else None,
                               tokenizer_path=args.tokenizer, load_unverified=args.load_unverified)
        else:
            config = load_config(args.config, overrides)
            out = (import_from_hf(args.hf_dir, args.out_folder, config, args.overwrite) if args.command == "from-hf"
                   else write_seed_checkpoint(config, args.out_folder, args.overwrite))
        print(f"wrote {out}")
    except (ConvertError, CheckpointError, ConfigError) as error:
        print(f"titanlite.convert: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
