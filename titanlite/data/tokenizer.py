"""Byte-level BPE tokenizer: a thin wrapper around a `tiktoken.Encoding`.

`build_tokenizer(path)` accepts
  * "default": the small BPE shipped in `titanlite/data/assets/default.tiktoken` (trained on the
    generated corpus by `scripts/train_tokenizer.py`), with 8 special tokens;
  * a tiktoken BPE file (lines of `base64(token bytes) rank`) that titanlite recognises by its
    sha256: r50k_base (GPT-2's `gpt2.tiktoken`), p50k_base, cl100k_base, o200k_base, Llama 3's
    `tokenizer.model`, or the shipped default. Such a file holds only the ranks; each gets the
    split pattern and special tokens its encoding defines (tiktoken_ext/openai_public.py, Llama 3's
    tokenizer.py). Any other BPE file is refused: nothing in it says how it splits text;
  * "llama3:<file>": a BPE file stated to be laid out as Llama 3's (its split pattern, 256 special
    tokens after the ranks), e.g. one written by scripts/train_tokenizer.py without --files;
  * a Hugging Face byte-level BPE `tokenizer.json` (e.g. Llama 3's), converted to tiktoken
    ranks, split pattern and special tokens at load (titanlite/data/hf_tokenizer.py), or refused
    when tiktoken would give other ids: the way to bring any other tokenizer;
  * "tiktoken:<name>" (cl100k_base, o200k_base, ...) when tiktoken has it cached locally:
    we never download, since training nodes are often offline.
Local files are read directly, never through tiktoken's cache (it keys local files by path, so
a tokenizer retrained at the same path would load the old vocabulary).
"""

import base64
import binascii
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken

from titanlite.data.hf_tokenizer import (BytePairEncoding, HFTokenizerError, read_hf_tokenizer)

# Pre-tokenization split of GPT-4 (cl100k) and Llama 3: contractions, words with one optional
# leading non-letter, numbers in groups of up to 3 digits, punctuation runs, and whitespace
# (a space before a word stays attached to the word).
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

DEFAULT_TOKENIZER_FILE = Path(__file__).parent / "assets" / "default.tiktoken"
DEFAULT_NUM_SPECIAL_TOKENS = 8
LLAMA3_NUM_SPECIAL_TOKENS = 256
BEGIN_OF_TEXT, END_OF_TEXT = "<|begin_of_text|>", "<|end_of_text|>"

# Where tiktoken's named encodings come from; we only look for these in tiktoken's cache.
_BLOB = "https://openaipublic.blob.core.windows.net/encodings/"
_NAMED_ENCODING_URLS = {name: f"{_BLOB}{file}.tiktoken" for name, file in [
    ("r50k_base", "r50k_base"), ("p50k_base", "p50k_base"), ("p50k_edit", "p50k_base"),
    ("cl100k_base", "cl100k_base"), ("o200k_base", "o200k_base"),
    ("o200k_harmony", "o200k_base")]}


ENDOFTEXT = "<|endoftext|>"
# GPT-2's split (r50k_base, p50k_base), in tiktoken's possessive form, as tiktoken_ext/openai_public.py has it.
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+"""])


@dataclass(frozen=True)
class BPELayout:
    """How a tiktoken BPE file is run: the file holds only the ranks, the encoding defines the rest."""

    name: str
    pattern: str
    special_tokens: dict[str, int] = field(default_factory=dict)  # empty: Llama 3's, right after the ranks
    num_special_tokens: int = LLAMA3_NUM_SPECIAL_TOKENS  # how many of Llama 3's (empty special_tokens only)
    bos: str = BEGIN_OF_TEXT
    eos: str = END_OF_TEXT


LLAMA3_LAYOUT = BPELayout("Llama 3", PAT_STR)
DEFAULT_LAYOUT = BPELayout("titanlite's default tokenizer", PAT_STR, num_special_tokens=DEFAULT_NUM_SPECIAL_TOKENS)


def _gpt_layout(name: str, pattern: str, special_tokens: dict[str, int]) -> BPELayout:
    # GPT-style encodings have one document separator and no BOS: it is both.
    return BPELayout(name, pattern, special_tokens, bos=ENDOFTEXT, eos=ENDOFTEXT)


# sha256 of the file's bytes -> its layout. The OpenAI hashes, patterns and special tokens are
# tiktoken's (tiktoken_ext/openai_public.py, checked against it by tests/data/test_tokenizer.py;
# p50k_edit and o200k_harmony share their base's file: a file gets the base encoding). Llama 3's
# tokenizer.model (2,183,982 bytes; the same file in Llama 3, 3.1, 3.2 and 3.3) is Meta's
# release's, with the pattern and special tokens of its tokenizer.py. The shipped default is
# recognised by comparing with the asset itself (see `_layout_of`), so retraining it needs no edit here.
KNOWN_BPE_FILES = {
    "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930":
        _gpt_layout("r50k_base", R50K_PATTERN, {ENDOFTEXT: 50256}),
    "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069":
        _gpt_layout("p50k_base", R50K_PATTERN, {ENDOFTEXT: 50256}),
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7":
        _gpt_layout("cl100k_base", CL100K_PATTERN, {ENDOFTEXT: 100257, "<|fim_prefix|>": 100258,
                                                    "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
                                                    "<|endofprompt|>": 100276}),
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d":
        _gpt_layout("o200k_base", O200K_PATTERN, {ENDOFTEXT: 199999, "<|endofprompt|>": 200018}),
    "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55": LLAMA3_LAYOUT,
}
LLAMA3_PREFIX = "llama3:"


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded, or that does not match data or a checkpoint."""


def llama3_special_tokens(count: int) -> list[str]:
    """The first `count` special tokens in Llama 3's order (Llama 3 itself uses 256)."""
    reserved = (f"<|reserved_special_token_{i}|>" for i in range(max(count, 6)))
    named = [BEGIN_OF_TEXT, END_OF_TEXT, next(reserved), next(reserved), next(reserved),
             next(reserved), "<|start_header_id|>", "<|end_header_id|>", next(reserved),
             "<|eot_id|>"]
    return (named + list(reserved))[:count]


def compute_fingerprint(ranks: dict[bytes, int], special_tokens: dict[str, int]) -> str:
    """sha256 hex of the (token bytes, id) table: equal fingerprints mean identical ids."""
    digest = hashlib.sha256()
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        digest.update(token.hex().encode() + b" %d\n" % rank)
    for name, token_id in sorted(special_tokens.items(), key=lambda item: item[1]):
        digest.update(b"special %s %d\n" % (name.encode(), token_id))
    return digest.hexdigest()


class Tokenizer:
    """Text <-> token ids. EOS (`eos_id`) separates documents in packed sequences."""

    def __init__(self, encoding: tiktoken.Encoding, name: str, bos_id: int, eos_id: int,
                 fingerprint: str):
        self.encoding = encoding
        self.name = name
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.fingerprint = fingerprint

    def byte_pair_encoding(self) -> BytePairEncoding:
        """Ranks, split pattern and special tokens (for export as a Hugging Face tokenizer.json)."""
        specials = self.encoding._special_tokens  # tiktoken keeps them private; they are its constructor's input
        names = {token_id: text for text, token_id in specials.items()}
        return BytePairEncoding(self.encoding._mergeable_ranks, self.encoding._pat_str, dict(specials),
                                names[self.bos_id], names[self.eos_id])

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included, before padding for the embedding."""
        return self.encoding.n_vocab

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        # encode_ordinary: "<|end_of_text|>" typed in a document is plain text, never a special.
        return self._wrap(self.encoding.encode_ordinary(text), bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False,
                     num_threads: int = 8) -> list[list[int]]:
        batch = self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)
        return [self._wrap(ids, bos, eos) for ids in batch]

    def decode(self, ids) -> str:
        """Never raises: broken UTF-8 and unknown ids (e.g. from vocab padding) become U+FFFD."""
        ids = [int(i) for i in ids]
        try:
            return self.encoding.decode(ids, errors="replace")
        except (KeyError, OverflowError, ValueError):
            pieces = []
            for i in ids:
                try:
                    pieces.append(self.encoding.decode_single_token_bytes(i))
                except (KeyError, OverflowError, ValueError):
                    pieces.append("\ufffd".encode())
            return b"".join(pieces).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, "
                f"fingerprint={self.fingerprint[:12]})")


def parse_tiktoken_ranks(data: bytes) -> dict[bytes, int]:
    """The ranks of a tiktoken BPE file's bytes, parsed here (tiktoken's loader caches local files by path)."""
    ranks = {}
    for number, line in enumerate(data.splitlines(), 1):
        if line.strip():
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"line {number} is not 'base64(token) rank': {line[:60]!r}") from None
    return ranks


def _make_tokenizer(name: str, ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int],
                    bos: str, eos: str) -> Tokenizer:
    encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
    return Tokenizer(encoding, name, special_tokens[bos], special_tokens[eos],
                     compute_fingerprint(ranks, special_tokens))


def _layout_of(digest: str) -> BPELayout | None:
    """The layout of a BPE file whose bytes have this sha256, or None when titanlite does not know it."""
    if digest == hashlib.sha256(DEFAULT_TOKENIZER_FILE.read_bytes()).hexdigest():
        return DEFAULT_LAYOUT
    return KNOWN_BPE_FILES.get(digest)


def _load_bpe_file(path: Path, name: str, stated: BPELayout | None, num_special_tokens: int | None) -> Tokenizer:
    """A tokenizer.json, or a tiktoken BPE file run with the layout `stated` or recognised by content."""
    fix = ("set tokenizer.path to a byte-level BPE tokenizer.json, a known tiktoken BPE file (e.g. Llama 3's "
           "tokenizer.model), 'default', or 'tiktoken:<name>'")
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist or is not a file: {fix}")
    data = path.read_bytes()
    if data[:64].lstrip().startswith(b"{"):
        if stated is LLAMA3_LAYOUT:
            raise TokenizerError(f"tokenizer.path={name}: {path} is a tokenizer.json, which carries its own split "
                                 f"pattern and special tokens: drop the '{LLAMA3_PREFIX}' prefix")
        return _load_hf_tokenizer_json(path, name, fix)
    try:
        ranks = parse_tiktoken_ranks(data)
    except ValueError as e:
        raise TokenizerError(f"tokenizer file {path} is not a tiktoken BPE file ({e})"
                             f" (a SentencePiece model, as in Llama 2, is not supported): {fix}")
    digest = hashlib.sha256(data).hexdigest()
    recognised = _layout_of(digest)
    if stated and recognised and recognised is not stated:
        raise TokenizerError(f"tokenizer.path={name}: {path} is the BPE file of {recognised.name}, whose split "
                             f"pattern and special tokens are not Llama 3's: drop the '{LLAMA3_PREFIX}' prefix")
    # An explicit count of Llama 3's special tokens states that layout for a file titanlite does not know.
    layout = stated or recognised or (LLAMA3_LAYOUT if num_special_tokens is not None else None)
    if layout is None:
        raise TokenizerError(
            f"tokenizer file {path} (sha256 {digest[:12]}…) is a tiktoken BPE file titanlite does not recognise "
            f"(it knows r50k_base, p50k_base, cl100k_base, o200k_base, Llama 3's tokenizer.model and its own "
            f"default by content), and the file holds no split pattern or special tokens: use a tokenizer.json, "
            f"which carries them (the model's own, or `scripts/train_tokenizer.py --files DIR --output-dir OUT` "
            f"trains one), or, if it was made with Llama 3's pattern and special tokens, set "
            f"tokenizer.path={LLAMA3_PREFIX}{path}")
    if layout.special_tokens:
        if num_special_tokens is not None:
            raise TokenizerError(f"num_special_tokens={num_special_tokens}: {path} is the BPE file of "
                                 f"{layout.name}, whose special tokens are fixed")
        special_tokens = layout.special_tokens
        taken = sorted(set(special_tokens.values()) & set(ranks.values()))
        if taken:
            raise TokenizerError(f"tokenizer file {path}: rank {taken[0]} is also {layout.name}'s special token id")
    else:
        count = layout.num_special_tokens if num_special_tokens is None else num_special_tokens
        if count < 2:
            raise TokenizerError(f"num_special_tokens={count}: need at least 2 (BOS, EOS)")
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise TokenizerError(f"tokenizer file {path}: ranks are not 0..{len(ranks) - 1} "
                                 f"without gaps or repeats: {fix}")
        # Llama 3 layout: special ids follow the BPE ranks, so BOS = len(ranks), EOS = BOS + 1.
        special_tokens = {token: len(ranks) + i for i, token in enumerate(llama3_special_tokens(count))}
    if any(bytes([b]) not in ranks for b in range(256)):
        raise TokenizerError(f"tokenizer file {path} lacks some of the 256 single-byte tokens, "
                             f"so it cannot encode every text: {fix}")
    return _make_tokenizer(name, ranks, layout.pattern, special_tokens, layout.bos, layout.eos)


def _load_hf_tokenizer_json(path: Path, name: str, fix: str) -> Tokenizer:
    try:
        bpe = read_hf_tokenizer(path)
    except HFTokenizerError as e:
        raise TokenizerError(f"tokenizer file {path}: {e}: {fix}") from None
    try:
        return _make_tokenizer(name, bpe.ranks, bpe.pattern, bpe.special_tokens, bpe.bos_token, bpe.eos_token)
    except ValueError as e:  # tiktoken rejects the split regex
        raise TokenizerError(f"tokenizer file {path}: tiktoken cannot use its split pattern ({e}): {fix}") from None


def _tiktoken_cache_dir() -> str:
    # Mirrors tiktoken.load.read_file_cached, so that we can look before it downloads.
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _load_named_encoding(encoding_name: str) -> Tokenizer:
    name = f"tiktoken:{encoding_name}"
    if encoding_name not in _NAMED_ENCODING_URLS:
        raise TokenizerError(f"tokenizer.path={name}: unknown encoding; known: "
                             f"{', '.join(_NAMED_ENCODING_URLS)}, or give a BPE file path")
    url = _NAMED_ENCODING_URLS[encoding_name]
    cache_dir = _tiktoken_cache_dir()
    cached_file = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
    if not cache_dir or not os.path.isfile(cached_file):
        raise TokenizerError(
            f"tokenizer.path={name}: {cached_file} is not in tiktoken's cache and titanlite never "
            f"downloads; on a machine with network run `python -c \"import tiktoken; "
            f"tiktoken.get_encoding('{encoding_name}')\"` with TIKTOKEN_CACHE_DIR set, copy that "
            f"folder here and set TIKTOKEN_CACHE_DIR to it (or pass the .tiktoken file's path)")
    try:
        encoding = tiktoken.get_encoding(encoding_name)
    except Exception as e:  # a corrupt cache entry makes tiktoken try the network
        raise TokenizerError(f"tokenizer.path={name}: cached file {cached_file} failed to load "
                             f"({e}); delete it and cache it again") from e
    # GPT-style encodings have one document separator and no BOS: use it for both.
    fingerprint = compute_fingerprint(encoding._mergeable_ranks, encoding._special_tokens)
    return Tokenizer(encoding, name, encoding.eot_token, encoding.eot_token, fingerprint)


def build_tokenizer(path: str, num_special_tokens: int | None = None) -> Tokenizer:
    """Load "default", "tiktoken:<name>", "llama3:<file>" or a file path (see the module docstring).

    `num_special_tokens`: how many of Llama 3's special tokens follow the ranks, for "default" (8),
    Llama 3's file (256) and "llama3:<file>" (256); given for a BPE file titanlite does not
    recognise, it states that the file is laid out as Llama 3's, as the prefix does.
    """
    if path.startswith("tiktoken:"):
        return _load_named_encoding(path.removeprefix("tiktoken:"))
    if path == "default":
        return _load_bpe_file(DEFAULT_TOKENIZER_FILE, "default", DEFAULT_LAYOUT, num_special_tokens)
    if path.startswith(LLAMA3_PREFIX):
        return _load_bpe_file(Path(path.removeprefix(LLAMA3_PREFIX)).expanduser(), path, LLAMA3_LAYOUT,
                              num_special_tokens)
    return _load_bpe_file(Path(path).expanduser(), path, None, num_special_tokens)


def default_tokenizer_warning(tokenizer_path: str, data_source: str) -> str | None:
    """The start-up warning for the bundled tokenizer used on other data than the default corpus, or None.

    The bundled BPE (2,000 tokens + 8 specials) was trained on the generated corpus only; on English
    text it gives 1.4-1.7 bytes per token (measured on licence texts and this README; 1.37 on man
    pages), so a sequence holds a fraction of the text a large vocabulary would put in it.
    """
    if tokenizer_path != "default" or data_source == "default":
        return None
    return (f"tokenizer.path=default is the small BPE made for the generated default corpus; on data.source="
            f"{data_source} it gives only ~1.4 bytes per token of English: for real text set "
            f"tokenizer.path to a real tokenizer (e.g. Llama 3's tokenizer.model) and prepare the data with it")


def check_vocab_compatible(tokenizer: Tokenizer, recorded_fingerprint: str, source: str,
                           fix: str = "re-run titanlite.prepare") -> None:
    """Raise TokenizerError if `source` (e.g. "dataset manifest data/manifest.json") was made
    with a tokenizer other than `tokenizer`; `fix` ends the message."""
    if recorded_fingerprint != tokenizer.fingerprint:
        raise TokenizerError(
            f"{source} was made with tokenizer {recorded_fingerprint[:12]}… but "
            f"tokenizer.path={tokenizer.name} has {tokenizer.fingerprint[:12]}…: "
            f"{fix} or set tokenizer.path to the tokenizer it was made with")
