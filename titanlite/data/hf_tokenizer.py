"""Hugging Face `tokenizer.json` <-> tiktoken BPE (ranks, split pattern, special tokens), exactly.

Both run byte-level BPE on the pieces a split regex cuts from the text; they differ in how
they pick the next merge. tiktoken merges the adjacent pair whose concatenation has the lowest
rank (any pair that concatenates to a token), and encodes a piece that is a whole token as that
token. HF's BPE model merges the adjacent pair that comes first in its `merges` list, and with
`ignore_merges` looks whole pieces up first. The two give the same ids when:
  - token ids are tiktoken ranks and the merges are listed in the order of their result's id;
  - each multi-byte token t has exactly the merge tiktoken makes it from: the last merge of
    tiktoken's BPE run on t's own bytes. Whenever tiktoken forms t inside a longer piece, the
    pieces inside t's span went through that same run (a merge across the span's edge would have
    broken it), so its last merge is the only way t is ever formed; a token that run does not
    reach is only ever a whole piece, which `ignore_merges` covers.
`hf_tokenizer_json` writes merges that way; `read_hf_tokenizer` accepts a file only if its
merges are exactly those (otherwise the ids would differ on some text: it refuses).

Token strings in tokenizer.json are bytes mapped to printable characters (GPT-2's byte-level
alphabet); merges are written as "a b" strings, which every `tokenizers` version reads (a byte-
level token never contains a space: the space byte is written as "Ġ").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The pattern of HF's ByteLevel pre-tokenizer with use_regex=true (GPT-2's).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class HFTokenizerError(ValueError):
    """A tokenizer.json that cannot be run as tiktoken BPE with the same ids; the message says why."""


@dataclass
class BytePairEncoding:
    """What a tiktoken Encoding is made of, plus which special tokens are BOS and EOS."""

    ranks: dict[bytes, int]  # token bytes -> id (= merge priority)
    pattern: str  # the pre-tokenization split regex
    special_tokens: dict[str, int]  # text -> id
    bos_token: str
    eos_token: str


def byte_to_char() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for chars from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    for offset, byte in enumerate(b for b in range(256) if b not in mapping):
        mapping[byte] = chr(256 + offset)
    return mapping


def last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The pair tiktoken's BPE run on `token`'s own bytes merges last into `token`; None if it never forms it."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best = rank, i
        if best_rank is None:
            return None
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 and token in ranks else None


def merges_of(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """HF merges equivalent to tiktoken's BPE over `ranks`, in the order of their result's id."""
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1 and (pair := last_merge(token, ranks)) is not None:
            merges.append(pair)
    return merges


def hf_tokenizer_json(bpe: BytePairEncoding) -> dict:
    """A tokenizer.json (tokenizers' serialisation) that encodes and decodes as tiktoken does with `bpe`.

    No post-processor: like titanlite's `encode`, it adds no BOS/EOS (training documents carry none).
    """
    char = byte_to_char()

    def text(token: bytes) -> str:
        return "".join(char[b] for b in token)

    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for content, token_id in sorted(bpe.special_tokens.items(), key=lambda item: item[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": bpe.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(token): rank for token, rank in sorted(bpe.ranks.items(), key=lambda item: item[1])},
                  "merges": [f"{text(a)} {text(b)}" for a, b in merges_of(bpe.ranks)]},
    }


def write_hf_tokenizer(bpe: BytePairEncoding, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json in out_dir, for `AutoTokenizer.from_pretrained(out_dir)`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(hf_tokenizer_json(bpe), ensure_ascii=False))
    # The generic fast tokenizer runs tokenizer.json as it is (the Llama class would add a BOS);
    # clean_up_tokenization_spaces would change " ." into "." when decoding.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bpe.bos_token, "eos_token": bpe.eos_token,
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


# --- reading ---------------------------------------------------------------------------------

def _split_pattern(pre_tokenizer: dict | None) -> str:
    """The split regex of a byte-level pre-tokenizer: Split(Regex) then ByteLevel, or ByteLevel alone."""
    is_sequence = pre_tokenizer and pre_tokenizer.get("type") == "Sequence"
    steps = pre_tokenizer.get("pretokenizers", []) if is_sequence else [pre_tokenizer]
    kinds = [step and step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PATTERN
    if (kinds == ["Split", "ByteLevel"] and "Regex" in steps[0].get("pattern", {})
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        # HF keeps the text between matches as pieces of its own; tiktoken encodes matches only, so
        # each unmatched stretch becomes a match of the second alternative.
        pattern = steps[0]["pattern"]["Regex"]
        return f"(?:{pattern})|(?:(?!(?:{pattern}))[\\s\\S])+"
    raise HFTokenizerError(f"pre_tokenizer {json.dumps(pre_tokenizer)[:120]} is not a byte-level split "
                           "(Split(Regex, Isolated) then ByteLevel, or ByteLevel with its regex, no prefix space)")


def _bos_eos(path: Path, special_tokens: dict[str, int]) -> tuple[str, str]:
    """BOS/EOS as tokenizer_config.json beside the file names them, else by Llama 3's or GPT's names."""
    config_path = path.with_name("tokenizer_config.json")
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, ValueError) as error:
        raise HFTokenizerError(f"{config_path} beside it is not readable JSON ({error})") from None
    bos, eos = (config.get(key) for key in ("bos_token", "eos_token"))
    bos, eos = (value.get("content") if isinstance(value, dict) else value for value in (bos, eos))
    if eos is None:
        for bos_name, eos_name in (("<|begin_of_text|>", "<|end_of_text|>"), ("<s>", "</s>"),
                                   ("<|endoftext|>", "<|endoftext|>")):
            if eos_name in special_tokens:
                bos, eos = bos or bos_name, eos_name
                break
    bos = bos or eos  # GPT-style tokenizers have one separator and no BOS
    if eos not in special_tokens or bos not in special_tokens:
        raise HFTokenizerError(f"cannot tell which special tokens are BOS and EOS (found {bos!r}, {eos!r}): put a "
                               "tokenizer_config.json with bos_token and eos_token beside it")
    return bos, eos


def read_hf_tokenizer(path: Path) -> BytePairEncoding:
    """The tiktoken form of a byte-level BPE tokenizer.json; HFTokenizerError if the ids could differ."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model, kind = data["model"], data["model"].get("type")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise HFTokenizerError(f"not a tokenizer.json ({error!r})") from None
    if kind != "BPE" or not isinstance(model.get("vocab"), dict):
        raise HFTokenizerError(f"model type {kind!r}: only byte-level BPE converts")
    for key, neutral in (("dropout", None), ("continuing_subword_prefix", None), ("end_of_word_suffix", None),
                         ("byte_fallback", False)):
        if model.get(key, neutral) not in (neutral, 0.0, ""):
            raise HFTokenizerError(f"model.{key}={model[key]!r}: tiktoken has no equivalent")
    if data.get("normalizer") is not None:
        raise HFTokenizerError(f"normalizer {data['normalizer'].get('type')!r}: tiktoken does not normalize text")
    if (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise HFTokenizerError(f"decoder {(data.get('decoder') or {}).get('type')!r}: only ByteLevel converts")
    pattern = _split_pattern(data.get("pre_tokenizer"))

    byte_of = {char: byte for byte, char in byte_to_char().items()}
    added = {token["content"]: token for token in data.get("added_tokens", [])}
    ranks = {}
    for text, token_id in model["vocab"].items():
        if text in added and added[text].get("special"):
            continue  # a special token that the vocab lists too (GPT-2's <|endoftext|>)
        if any(char not in byte_of for char in text):
            raise HFTokenizerError(f"vocab entry {text!r} (id {token_id}) is not byte-level encoded")
        ranks[bytes(byte_of[char] for char in text)] = token_id
    special_tokens = {}
    for content, token in added.items():
        if not token.get("special"):
            raise HFTokenizerError(f"added token {content!r} (id {token['id']}) is not special: tiktoken cannot "
                                   "split it out of text before BPE")
        special_tokens[content] = token["id"]
    ids = [*ranks.values(), *special_tokens.values()]
    if len(set(ids)) != len(ids):
        raise HFTokenizerError("two tokens share an id")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise HFTokenizerError(f"{len(missing)} of the 256 single bytes have no token (first: {missing[0]}), "
                               "so it cannot encode every text")
    _check_merges(model, ranks, byte_of)
    bos, eos = _bos_eos(path, special_tokens)
    return BytePairEncoding(ranks, pattern, special_tokens, bos, eos)


def _check_merges(model: dict, ranks: dict[bytes, int], byte_of: dict[str, int]) -> None:
    """Refuse merges other than the ones tiktoken's BPE makes (see the module docstring)."""
    def to_bytes(text: str) -> bytes:
        return bytes(byte_of[char] for char in text)

    listed = {}
    for merge in model.get("merges", []):
        try:
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            pair = (to_bytes(a), to_bytes(b))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HFTokenizerError(f"merge {merge!r} is not two byte-level tokens") from None
        if pair[0] + pair[1] not in ranks:
            raise HFTokenizerError(f"merge {a!r} + {b!r} makes no token of the vocab")
        if pair[0] + pair[1] in listed:
            raise HFTokenizerError(f"two merges make {a + b!r}: tiktoken's BPE has one way to each token")
        listed[pair[0] + pair[1]] = pair
    order = [ranks[token] for token in listed]
    if order != sorted(order):
        raise HFTokenizerError("merges are not in the order of their tokens' ids, so ids are not merge priorities")
    for token, rank in ranks.items():
        if len(token) > 1 and last_merge(token, ranks) != listed.get(token):
            raise HFTokenizerError(f"token {token!r} (id {rank}): its merge is not the one tiktoken's BPE makes, so "
                                   "some texts would get other ids")
    if not model.get("ignore_merges") and len(listed) < sum(len(token) > 1 for token in ranks):
        raise HFTokenizerError("ignore_merges=false and some tokens have no merge: HF never emits them, tiktoken "
                               "does for a piece that is exactly that token")
