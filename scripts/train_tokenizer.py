"""Train the small byte-level BPE shipped as titanlite/assets/default.tiktoken.

    python scripts/train_tokenizer.py [--vocab-size 2000] [--num-documents 10000]

Trains on the generated corpus (titanlite/corpus.py) with the GPT-4 / Llama 3 pre-tokenization
split and writes the standard tiktoken BPE format (`base64(token bytes) rank` per line, as in
Llama 3's tokenizer.model). Ranks 0..255 are the single bytes; merged tokens follow in the order
they were learned, which is the merge priority tiktoken applies when encoding.
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

from titanlite.corpus import DEFAULT_CORPUS_SEED, generate_documents  # noqa: E402
from titanlite.tokenizer import DEFAULT_TOKENIZER_FILE, PAT_STR  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=2000,
                        help="BPE ranks including the 256 single bytes (special tokens excluded)")
    parser.add_argument("--num-documents", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=DEFAULT_CORPUS_SEED)
    parser.add_argument("--output", type=Path, default=DEFAULT_TOKENIZER_FILE)
    args = parser.parse_args()

    start = time.perf_counter()
    documents = generate_documents(args.num_documents, seed=args.seed)
    ranks = train_bpe(count_pretokens(documents), args.vocab_size)
    write_tiktoken_bpe(ranks, args.output)
    print(f"wrote {len(ranks)} ranks to {args.output} ({args.output.stat().st_size} bytes) "
          f"from {len(documents)} documents in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
