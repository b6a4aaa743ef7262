"""Sampling from a checkpoint: greedy or temperature / top-p, with a KV cache, on one device.

    python -m titanlite.generate CHECKPOINT --prompt "Once upon a time" [--max-new-tokens 64]
        [--temperature 0] [--top-p 1] [--seed 0] [--device cpu|cuda] [--dtype float32|bfloat16]
        [--tokenizer PATH] [--json]

CHECKPOINT is one `step-N` folder saved under any layout (one process, FSDP, TP, HSDP): DCP's
reader assembles the full tensors in this one process, and the checkpoint's meta.json gives the
model config and the tokenizer. The prompt starts a new document as training showed documents
(`document_prompt`): after an EOS for a model that attended across documents, alone (position 0,
nothing before it) for one trained with the document mask. Generation stops at EOS or after
--max-new-tokens. stdout gets the completion only (with --json: one JSON object with
the token ids); a summary line goes to stderr. Bad input: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from titanlite.checkpoint.folders import STEP_FOLDER, read_checkpoint
from titanlite.checkpoint.storage import CheckpointError
from titanlite.checkpoint.weights import load_model_weights
from titanlite.config.load import config_from_dict
from titanlite.config.settings import ConfigError
from titanlite.data.tokenizer import TokenizerError, build_tokenizer
from titanlite.model.kv_cache import KVCache
from titanlite.model.rope import rope_tables
from titanlite.model.transformer import Transformer, build_model


class GenerateError(ValueError):
    """Input generation cannot use; the message is one line naming the culprit and the fix."""


# --- choosing the next token

def nucleus_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (vocab,) -> bool (vocab,): the smallest set of most likely tokens whose mass reaches top_p.

    A token is in the nucleus when the tokens more likely than it hold less than top_p; so the most
    likely token always is. top_p >= 1 keeps every token (a float cumsum may reach 1 early).
    """
    if top_p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    mask = torch.zeros_like(probs, dtype=torch.bool)
    mask[order] = mass_before < top_p
    return mask


def choose_token(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None = None) -> int:
    """logits (vocab,) -> the next token id: argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to its top-p nucleus (renormalized)."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    probs = probs * nucleus_mask(probs, top_p)
    return int(torch.multinomial(probs, 1, generator=generator))  # multinomial renormalizes


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_id: int | None = None, generator: torch.Generator | None = None,
             vocab_size: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token id, the logits (vocab,) float32 it was chosen from) for each new token of one sequence.

    The prompt runs once; every later step feeds only the new token, its context coming from the
    KV cache. Stops after `stop_id` (yielded) or `max_new_tokens`. vocab_size: choose only among
    the first ids (the tokenizer's; the embedding is padded past them).
    """
    device = model.tok_embeddings.weight.device
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, model.tok_embeddings.weight.dtype, device)
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    with cache.attached(model):
        for _ in range(max_new_tokens):
            logits = model(tokens, positions=cache.positions(tokens.shape[1]))[0, -1, :vocab_size].float()
            cache.advance(tokens.shape[1])
            token = choose_token(logits, temperature, top_p, generator)  # host sync: one per token, for the stop test
            yield token, logits
            if token == stop_id:
                return
            tokens = torch.tensor([[token]], dtype=torch.long, device=device)


# --- loading

def load_model(checkpoint: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               max_seq_len: int = 0, load_unverified: bool = False) -> tuple[Transformer, dict]:
    """The checkpoint's model on `device` in `dtype` (RoPE tables stay float32), eval mode; and its meta.json.

    max_seq_len: tokens the RoPE tables must cover (at least the trained seq_len). load_unverified:
    accept a checkpoint without checksums.
    """
    checkpoint = Path(checkpoint)
    weights, meta = load_model_weights(checkpoint, load_unverified)
    saved = meta.get("config") or {}
    try:  # settings added or removed since the checkpoint was written keep today's defaults or are ignored
        config = config_from_dict(saved).model
    except (ConfigError, AttributeError, TypeError) as error:
        raise CheckpointError(f"{checkpoint / 'meta.json'} has no usable model config ({type(error).__name__}: "
                              f"{error}): it was written by another program or version") from None
    if config.vocab_size <= 0:
        raise CheckpointError(f"{checkpoint / 'meta.json'}: model.vocab_size={config.vocab_size}, not resolved")
    trained_len = int(saved.get("training", {}).get("seq_len", 0))
    model = build_model(config, max(max_seq_len, trained_len, 1), device="meta")
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    wrong = [f"{name} {tuple(weights[name].shape)} (config: {tuple(expected[name].shape)})"
             for name in sorted(expected.keys() & weights.keys()) if weights[name].shape != expected[name].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"checkpoint {checkpoint} does not match its meta.json model config: missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")
    # assign=True: the loaded tensors become the parameters, no second copy.
    model.load_state_dict({name: tensor.to(device=device, dtype=dtype) for name, tensor in weights.items()},
                          assign=True)
    model.rope_cos, model.rope_sin = rope_tables(config, model.max_seq_len, device)  # fp32, never cast
    return model.eval(), meta


def read_meta(checkpoint: Path, load_unverified: bool = False) -> dict:
    """meta.json of one complete checkpoint; a CheckpointError saying what to pass if it is not one."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir() and not (checkpoint / "meta.json").exists():
        steps = sorted(path for path in checkpoint.iterdir() if STEP_FOLDER.match(path.name))
        if steps:
            raise CheckpointError(f"{checkpoint} is a folder of checkpoints, not one: pass one of them, "
                                  f"e.g. {steps[-1]}")
    return read_checkpoint(checkpoint, load_unverified)[0]


# --- command line

def _fail(message: str) -> None:
    print(f"titanlite.generate: {message}", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m titanlite.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint folder step-N (any layout)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many tokens (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (default 1: all tokens)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if visible")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.path to use instead of the checkpoint's")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the token ids")
    parser.add_argument("--load-unverified", action="store_true",
                        help="load a checkpoint whose meta.json has no checksums (its data unverified)")
    parser.error = _fail  # one line, not argparse's usage block
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise GenerateError(f"--temperature {args.temperature}: must be a finite number >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:  # also false for nan
        raise GenerateError(f"--top-p {args.top_p}: must be in (0, 1] (1 = no nucleus cut)")
    if args.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda but no CUDA device is visible: use --device cpu")


def document_prompt(prompt_ids: list[int], eos_id: int, model_settings: dict) -> list[int]:
    """The prompt as the start of a new document, as training showed documents to the model.

    A document starts after an EOS. A model that attended across documents (sdpa, positions
    counted along the row) always saw that EOS before a document's first token; one trained with
    the document mask (flex) or per-document positions never did: its documents start at
    position 0 with nothing before them.
    """
    attends_across = (model_settings.get("attention", "sdpa") == "sdpa"
                      and model_settings.get("positions", "sequence") == "sequence")
    return [eos_id, *prompt_ids] if attends_across else list(prompt_ids)


def run(args: argparse.Namespace) -> dict:
    """Generate as the command line says; returns what --json prints."""
    check_arguments(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    config = read_meta(args.checkpoint, args.load_unverified).get("config") or {}  # checks before the weights are read
    tokenizer_path = args.tokenizer or config.get("tokenizer", {}).get("path", "default")
    tokenizer = build_tokenizer(tokenizer_path)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise GenerateError(f"--prompt {args.prompt!r} encodes to no tokens: give some text")
    prompt = document_prompt(prompt_ids, tokenizer.eos_id, config.get("model", {}))
    total, trained_len = len(prompt) + args.max_new_tokens, config.get("training", {}).get("seq_len", 0)
    if trained_len and total > trained_len:
        print(f"titanlite.generate: warning: up to {total} tokens, past the {trained_len} the model was trained "
              f"on: expect worse text past that", file=sys.stderr)
    model, meta = load_model(args.checkpoint, device, dtype, max_seq_len=total, load_unverified=args.load_unverified)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise GenerateError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} ids but the model only "
                            f"{model.config.vocab_size}: pass the tokenizer the checkpoint was trained with (--tokenizer)")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    started = time.perf_counter()
    completion, stop_reason = [], "max_new_tokens"
    for token, _ in generate(model, prompt, args.max_new_tokens, args.temperature, args.top_p,
                             tokenizer.eos_id, generator, tokenizer.vocab_size):
        if token == tokenizer.eos_id:
            stop_reason = "eos"
            break
        completion.append(token)
    seconds = time.perf_counter() - started
    return {"checkpoint": str(args.checkpoint), "step": meta.get("step"), "prompt": args.prompt,
            "completion": tokenizer.decode(completion), "prompt_ids": prompt, "completion_ids": completion,
            "stop_reason": stop_reason, "seconds": round(seconds, 3), "device": device.type,
            "dtype": str(dtype).removeprefix("torch.")}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except (GenerateError, CheckpointError, TokenizerError) as error:
        _fail(str(error))
    if args.json:
        print(json.dumps(result))
    else:
        print(result["completion"])
    generated = len(result["completion_ids"]) + (result["stop_reason"] == "eos")
    print(f"titanlite.generate: step {result['step']}, {generated} tokens in {result['seconds']:.2f} s "
          f"({generated / max(result['seconds'], 1e-9):.1f} tokens/s, {result['device']} {result['dtype']}), "
          f"stopped at {result['stop_reason']}", file=sys.stderr)


if __name__ == "__main__":
    main()
