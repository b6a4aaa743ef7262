"""Train a byte-level BPE: on your own text (a real tokenizer, offline), or the one shipped for the default corpus.

    python scripts/train_tokenizer.py --files 'my_text/**/*.txt' --vocab-size 16000 --output-dir my_tokenizer
    python scripts/train_tokenizer.py [--vocab-size 2000] [--num-documents 10000]   # titanlite/data/assets/default.tiktoken

With --files (any data source titanlite.prepare reads: a file, a folder, a glob of .txt, .jsonl,
.json or .parquet), it writes `tokenizer.json` and `tokenizer_config.json` to --output-dir: set
`tokenizer.path = "my_tokenizer/tokenizer.json"` (Llama 3's 256 special tokens follow the ranks;
<|end_of_text|> ends each document). Without it, it trains on the generated corpus
(titanlite/data/corpus.py) and writes the shipped default, in tiktoken's BPE format
(`base64(token bytes) rank` per line, as in Llama 3's tokenizer.model). Either way the split is
GPT-4's / Llama 3's; ranks 0..255 are the single bytes, and merged tokens follow in the order they
were learned, which is the merge priority tiktoken applies when encoding. Training is plain
Python: about a minute for a few MB of text and 16k merges.
"""

import argparse
import base64
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import regex

# Run from a checkout without installing: make `titanlite` importable from the repo root.
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from titanlite.data.corpus import DEFAULT_CORPUS_SEED, generate_documents  # noqa: E402
from titanlite.data.documents import DataError, Settings, document_problem, iter_texts, resolve_files  # noqa: E402
from titanlite.data.hf_tokenizer import BytePairEncoding, write_hf_tokenizer  # noqa: E402
from titanlite.data.tokenizer import (BEGIN_OF_TEXT, DEFAULT_TOKENIZER_FILE, END_OF_TEXT,  # noqa: E402
                                      LLAMA3_NUM_SPECIAL_TOKENS, PAT_STR, llama3_special_tokens)


def count_pretokens(documents: list[str]) -> Counter:
    """How often each pre-token (the pieces BPE never merges across) occurs, as bytes."""
    pattern = regex.compile(PAT_STR)
    counts: Counter = Counter()
    for document in documents:
        counts.update(piece.encode("utf-8") for piece in pattern.findall(document))
    return counts


def train_bpe(pretoken_counts: Counter, vocab_size: int) -> dict[bytes, int]:
    """Greedy byte-level BPE: repeatedly merge the most frequent adjacent pair of tokens.

    Pair counts are updated incrementally (only the words that contain the merged pair are
    touched), so thousands of merges take seconds, not minutes.
    """
    vocab = [bytes([b]) for b in range(256)]  # token id -> bytes; id == rank
    words = [list(word) for word in pretoken_counts]  # each word as a list of token ids
    word_counts = list(pretoken_counts.values())
    pair_counts: Counter = Counter()
    words_with_pair: dict[tuple[int, int], set[int]] = defaultdict(set)
    for index, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += word_counts[index]
            words_with_pair[pair].add(index)

    while len(vocab) < vocab_size and pair_counts:
        # Ties broken by the merged bytes, so the result never depends on dict order.
        best = max(pair_counts, key=lambda p: (pair_counts[p], vocab[p[0]] + vocab[p[1]]))
        new_id = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        for index in sorted(words_with_pair.pop(best)):
            word, count = words[index], word_counts[index]
            for pair in zip(word, word[1:]):  # forget this word's old pairs ...
                pair_counts[pair] -= count
                if pair_counts[pair] <= 0:
                    del pair_counts[pair]
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            words[index] = merged
            for pair in zip(merged, merged[1:]):  # ... and count its new ones
                pair_counts[pair] += count
                words_with_pair[pair].add(index)
    return {token: rank for rank, token in enumerate(vocab)}


def write_tiktoken_bpe(ranks: dict[bytes, int], path: Path) -> None:
    lines = [base64.b64encode(token).decode() + f" {rank}\n"
             for token, rank in sorted(ranks.items(), key=lambda item: item[1])]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="ascii")


def read_documents(source: str, text_field: str, cache_dir: Path) -> list[str]:
    """Every document of `source` (files as titanlite.prepare reads them); DataError for an empty or bad one."""
    settings = Settings(source=source, files=resolve_files(source, "--files"), hub_config=None, split="train",
                        text_field=text_field, tokenizer="", tokenizer_fingerprint="", seq_len=0, rows_per_shard=0,
                        skip_bad_documents=False, max_documents=0)
    documents = []
    for where, row, text in iter_texts(settings, cache_dir):
        if problem := document_problem(text):
            raise DataError(f"{where} document {row + 1}: {problem}: remove or fix it")
        documents.append(text)
    if not documents:
        raise DataError(f"--files {source}: no documents")
    return documents


def write_tokenizer_json(ranks: dict[bytes, int], out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json: the ranks, GPT-4's split, Llama 3's special tokens after the ranks."""
    specials = {name: len(ranks) + i for i, name in enumerate(llama3_special_tokens(LLAMA3_NUM_SPECIAL_TOKENS))}
    write_hf_tokenizer(BytePairEncoding(ranks, PAT_STR, specials, BEGIN_OF_TEXT, END_OF_TEXT), out_dir,
                       model_max_length=1 << 20)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python scripts/train_tokenizer.py", description=__doc__.splitlines()[0])
    parser.add_argument("--files", default=None, help="your text: a file, folder or glob (.txt, .jsonl, .json, .parquet)")
    parser.add_argument("--text-field", default="text", help="--files rows: the column holding the text")
    parser.add_argument("--output-dir", type=Path, default=None, help="--files: where tokenizer.json goes")
    parser.add_argument("--vocab-size", type=int, default=2000,
                        help="BPE ranks including the 256 single bytes (special tokens excluded)")
    parser.add_argument("--num-documents", type=int, default=10000, help="without --files: generated documents")
    parser.add_argument("--seed", type=int, default=DEFAULT_CORPUS_SEED)
    parser.add_argument("--output", type=Path, default=DEFAULT_TOKENIZER_FILE, help="without --files: the .tiktoken file")
    args = parser.parse_args(argv)
    if args.vocab_size < 257:
        parser.error(f"--vocab-size {args.vocab_size}: must be > 256 (the single bytes come first)")
    if (args.files is None) != (args.output_dir is None):
        parser.error("--files and --output-dir go together: your text in, tokenizer.json out")

    start = time.perf_counter()
    if args.files:
        try:
            documents = read_documents(args.files, args.text_field, args.output_dir / ".cache")
        except DataError as error:
            print(f"train_tokenizer: error: {error}", file=sys.stderr)
            sys.exit(2)
        ranks = train_bpe(count_pretokens(documents), args.vocab_size)
        write_tokenizer_json(ranks, args.output_dir)
        written = args.output_dir / "tokenizer.json"
    else:
        documents = generate_documents(args.num_documents, seed=args.seed)
        ranks = train_bpe(count_pretokens(documents), args.vocab_size)
        write_tiktoken_bpe(ranks, args.output)
        written = args.output
    print(f"wrote {len(ranks)} ranks to {written} ({written.stat().st_size} bytes) "
          f"from {len(documents)} documents in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
