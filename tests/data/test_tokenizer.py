import base64
import importlib.util
from pathlib import Path

import pytest
from tiktoken.load import load_tiktoken_bpe

from titanlite.data.corpus import generate_documents
from titanlite.data.tokenizer import (DEFAULT_TOKENIZER_FILE, Tokenizer, TokenizerError, build_tokenizer,
                                      check_vocab_compatible, llama3_special_tokens)


def write_bpe_file(path, merged_tokens: list[bytes]) -> None:
    """A tiny tiktoken BPE file: the 256 single bytes, then `merged_tokens` in rank order."""
    tokens = [bytes([b]) for b in range(256)] + merged_tokens
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n"
                            for rank, t in enumerate(tokens)))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return build_tokenizer("default")


def test_shipped_file_is_standard_tiktoken_format():
    ranks = load_tiktoken_bpe(str(DEFAULT_TOKENIZER_FILE))
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert 1500 <= len(ranks) <= 2048
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert DEFAULT_TOKENIZER_FILE.stat().st_size < 100_000


def test_default_layout(tokenizer):
    assert tokenizer.name == "default"
    ranks = len(load_tiktoken_bpe(str(DEFAULT_TOKENIZER_FILE)))
    assert tokenizer.vocab_size == ranks + 8
    assert (tokenizer.bos_id, tokenizer.eos_id) == (ranks, ranks + 1)
    assert tokenizer.decode([tokenizer.eos_id]) == "<|end_of_text|>"


def test_round_trip_corpus_and_unicode(tokenizer):
    texts = generate_documents(50, seed=3) + [
        "", " ", "\n\n\t x", "héllo wörld", "日本語のテキスト", "emoji 🦙🔥 mix", "a\u0301\u200d",
        "Ünïcödé ½ ∑ 𝔘", "tabs\tand\r\nnewlines", "x" * 5000]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert [tokenizer.decode(ids) for ids in tokenizer.encode_batch(texts)] == texts


def test_bos_eos_and_batch(tokenizer):
    ids = tokenizer.encode("The capital", bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert ids[1:-1] == tokenizer.encode("The capital")
    batch = tokenizer.encode_batch(["a b", "c"], bos=False, eos=True)
    assert batch == [tokenizer.encode("a b", eos=True), tokenizer.encode("c", eos=True)]


def test_special_tokens_in_text_are_plain_text(tokenizer):
    text = "before <|end_of_text|> after <|begin_of_text|>"
    ids = tokenizer.encode(text)
    assert tokenizer.eos_id not in ids and tokenizer.bos_id not in ids
    assert tokenizer.decode(ids) == text


def test_decode_never_raises(tokenizer):
    # the first byte of "€" alone (single bytes keep their value as rank) is broken UTF-8
    assert tokenizer.decode([0xE2]) == "\ufffd"
    # ids past the vocabulary (e.g. sampled from the padded embedding rows) do not raise
    assert tokenizer.decode([tokenizer.vocab_size + 5, -1]).count("\ufffd") == 2
    assert tokenizer.decode(tokenizer.encode("ok") + [10**9]) == "ok\ufffd"


def test_compresses_corpus(tokenizer):
    documents = generate_documents(500, seed=11)  # not the documents it was trained on
    num_bytes = sum(len(d.encode()) for d in documents)
    num_tokens = sum(len(ids) for ids in tokenizer.encode_batch(documents))
    assert num_tokens / num_bytes < 0.35


def test_hand_written_file_specials_after_ranks(tmp_path):
    path = tmp_path / "tiny.tiktoken"
    write_bpe_file(path, [b"ab", b"abc", b" x"])
    tok = build_tokenizer(str(path), num_special_tokens=10)
    assert tok.vocab_size == 259 + 10
    assert (tok.bos_id, tok.eos_id) == (259, 260)
    assert tok.encode("abc") == [257]
    assert tok.encode("ab x") == [256, 258]
    assert tok.decode([259 + 9]) == "<|eot_id|>"  # Llama 3's order of special tokens
    assert build_tokenizer(str(path)).vocab_size == 259 + 256  # Llama 3's count by default


def test_llama3_special_token_layout():
    names = llama3_special_tokens(256)
    assert len(names) == len(set(names)) == 256
    assert names[:2] == ["<|begin_of_text|>", "<|end_of_text|>"]
    assert names[6:10] == ["<|start_header_id|>", "<|end_header_id|>",
                           "<|reserved_special_token_4|>", "<|eot_id|>"]
    assert names[-1] == "<|reserved_special_token_250|>"
    for count in range(1, 11):  # a short list is the first `count` of the same order
        assert llama3_special_tokens(count) == names[:count]


def test_fingerprint_stable_and_distinct(tmp_path, tokenizer):
    assert build_tokenizer("default").fingerprint == tokenizer.fingerprint
    assert len(tokenizer.fingerprint) == 64
    first, second = tmp_path / "a.tiktoken", tmp_path / "b.tiktoken"
    write_bpe_file(first, [b"ab"])
    write_bpe_file(second, [b"ba"])
    fp_first = build_tokenizer(str(first)).fingerprint
    assert fp_first != build_tokenizer(str(second)).fingerprint
    assert fp_first != build_tokenizer(str(first), num_special_tokens=8).fingerprint
    # the fingerprint depends on the token table, not on where the file lies
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "a.tiktoken").write_bytes(first.read_bytes())
    assert build_tokenizer(str(tmp_path / "copy" / "a.tiktoken")).fingerprint == fp_first


@pytest.mark.parametrize("content", [
    "not base64 at all\n", "QUI= x\n", "\x00\x01garbage", "QUI= 0\nQUM= 0\n"])
def test_malformed_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken.model"
    path.write_text(content)
    with pytest.raises(TokenizerError, match="broken.model"):
        build_tokenizer(str(path))


def test_missing_file_and_gaps(tmp_path):
    with pytest.raises(TokenizerError, match="nope.tiktoken.*does not exist"):
        build_tokenizer(str(tmp_path / "nope.tiktoken"))
    with pytest.raises(TokenizerError, match="is not a file"):
        build_tokenizer(str(tmp_path))
    no_bytes = tmp_path / "letters.tiktoken"
    no_bytes.write_text("".join(f"{base64.b64encode(bytes([65 + i])).decode()} {i}\n"
                                for i in range(26)))
    with pytest.raises(TokenizerError, match="single-byte"):
        build_tokenizer(str(no_bytes))


def test_local_file_is_read_afresh_not_from_tiktokens_cache(tmp_path, monkeypatch):
    # tiktoken's loader caches local files under a key made from the path: a tokenizer retrained
    # at the same path would load the old vocabulary.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "retrained.tiktoken"
    write_bpe_file(path, [b"ab"])
    first = build_tokenizer(str(path), num_special_tokens=8)
    assert first.encode("ab ba") == [256, 32, 98, 97]
    write_bpe_file(path, [b"ba"])
    second = build_tokenizer(str(path), num_special_tokens=8)
    assert second.encode("ab ba") == [97, 98, 32, 256]
    assert second.fingerprint != first.fingerprint


def test_named_encoding_not_cached_fails_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    requests = pytest.importorskip("requests")
    monkeypatch.setattr(requests, "get", lambda *a, **k: pytest.fail("tried the network"))
    with pytest.raises(TokenizerError, match="TIKTOKEN_CACHE_DIR"):
        build_tokenizer("tiktoken:cl100k_base")
    with pytest.raises(TokenizerError, match="unknown encoding"):
        build_tokenizer("tiktoken:no_such_encoding")


def test_check_vocab_compatible(tokenizer):
    check_vocab_compatible(tokenizer, tokenizer.fingerprint, "dataset manifest m.json")
    with pytest.raises(TokenizerError, match="dataset manifest m.json.*tokenizer.path=default"):
        check_vocab_compatible(tokenizer, "0" * 64, "dataset manifest m.json")


def test_shipped_file_matches_training_script(tmp_path):
    # The asset must be what scripts/train_tokenizer.py makes from the current corpus.py:
    # a corpus change without re-training would silently degrade compression.
    spec = importlib.util.spec_from_file_location(
        "train_tokenizer", Path(__file__).resolve().parents[2] / "scripts" / "train_tokenizer.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ranks = script.train_bpe(script.count_pretokens(generate_documents(10_000)), 2000)
    script.write_tiktoken_bpe(ranks, tmp_path / "retrained.tiktoken")
    assert (tmp_path / "retrained.tiktoken").read_bytes() == DEFAULT_TOKENIZER_FILE.read_bytes()


def test_default_tokenizer_warning_only_off_the_default_corpus(tokenizer):
    from titanlite.data.tokenizer import default_tokenizer_warning

    assert default_tokenizer_warning("default", "default") is None  # default tokenizer on the default corpus
    assert default_tokenizer_warning("llama3/tokenizer.model", "data/fw") is None
    warning = default_tokenizer_warning("default", "data/fw")
    assert "\n" not in warning and "data.source=data/fw" in warning and "~1.4 bytes per token" in warning
    # The figure it quotes: English prose through the bundled BPE, counted here (this module's own docstrings).
    import titanlite.data.tokenizer as module

    text = " ".join(part for part in (module.__doc__, module.default_tokenizer_warning.__doc__))
    assert 1.2 < len(text.encode()) / len(tokenizer.encode(text)) < 2.0
