import base64
import hashlib
import importlib.util
from pathlib import Path

import pytest
from tiktoken.load import load_tiktoken_bpe

from titanlite.data.corpus import generate_documents
from titanlite.data.tokenizer import (DEFAULT_TOKENIZER_FILE, KNOWN_BPE_FILES, PAT_STR, Tokenizer, TokenizerError,
                                      build_tokenizer, check_vocab_compatible, llama3_special_tokens)


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


def test_hand_written_file_stated_as_llama3_layout_gets_specials_after_ranks(tmp_path):
    path = tmp_path / "tiny.tiktoken"
    write_bpe_file(path, [b"ab", b"abc", b" x"])
    tok = build_tokenizer(str(path), num_special_tokens=10)  # an explicit count states Llama 3's layout
    assert tok.vocab_size == 259 + 10
    assert (tok.bos_id, tok.eos_id) == (259, 260)
    assert tok.encode("abc") == [257]
    assert tok.encode("ab x") == [256, 258]
    assert tok.decode([259 + 9]) == "<|eot_id|>"  # Llama 3's order of special tokens
    stated = build_tokenizer(f"llama3:{path}")
    assert stated.vocab_size == 259 + 256 and stated.encoding._pat_str == PAT_STR  # Llama 3's count and split
    assert stated.name == f"llama3:{path}"


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
    fp_first = build_tokenizer(f"llama3:{first}").fingerprint
    assert fp_first != build_tokenizer(f"llama3:{second}").fingerprint
    assert fp_first != build_tokenizer(str(first), num_special_tokens=8).fingerprint
    # the fingerprint depends on the token table, not on where the file lies
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "a.tiktoken").write_bytes(first.read_bytes())
    assert build_tokenizer(f"llama3:{tmp_path / 'copy' / 'a.tiktoken'}").fingerprint == fp_first


@pytest.mark.parametrize("content", [
    "not base64 at all\n", "QUI= x\n", "\x00\x01garbage", "QUI= 0\nQUM= 0\n"])
def test_malformed_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken.model"
    path.write_text(content)
    with pytest.raises(TokenizerError, match="broken.model"):
        build_tokenizer(str(path))
    with pytest.raises(TokenizerError, match="broken.model.* (is not a tiktoken BPE file|ranks are not)"):
        build_tokenizer(f"llama3:{path}")  # stated, so refused for what is wrong with it


def test_missing_file_and_gaps(tmp_path):
    with pytest.raises(TokenizerError, match="nope.tiktoken.*does not exist"):
        build_tokenizer(str(tmp_path / "nope.tiktoken"))
    with pytest.raises(TokenizerError, match="is not a file"):
        build_tokenizer(str(tmp_path))
    no_bytes = tmp_path / "letters.tiktoken"
    no_bytes.write_text("".join(f"{base64.b64encode(bytes([65 + i])).decode()} {i}\n"
                                for i in range(26)))
    with pytest.raises(TokenizerError, match="single-byte"):
        build_tokenizer(f"llama3:{no_bytes}")


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


# --- tiktoken BPE files recognised by content (issue 21): each with its own split pattern and special tokens

def test_known_files_table_is_what_tiktoken_declares(monkeypatch):
    """The hashes, patterns and special tokens titanlite knows are those of tiktoken's own package source:
    its encoding constructors run with the file loader replaced, so nothing is downloaded."""
    from tiktoken_ext import openai_public

    declared_hashes = []

    def load_nothing(url, expected_hash=None):
        declared_hashes.append(expected_hash)
        return {}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", load_nothing)
    for name in ("r50k_base", "p50k_base", "cl100k_base", "o200k_base"):
        definition = openai_public.ENCODING_CONSTRUCTORS[name]()
        layout = KNOWN_BPE_FILES[declared_hashes[-1]]
        assert (layout.name, layout.pattern, layout.special_tokens) == (
            name, definition["pat_str"], definition["special_tokens"])
        assert layout.bos == layout.eos == "<|endoftext|>"
    # every .tiktoken file tiktoken knows is known here (p50k_edit and o200k_harmony share their base's file;
    # gpt2 reads GPT-2's original vocab.bpe + encoder.json, whose content is r50k_base's), and no other.
    for name, constructor in openai_public.ENCODING_CONSTRUCTORS.items():
        if name != "gpt2":
            constructor()
    openai_files = {digest for digest, layout in KNOWN_BPE_FILES.items() if layout.name != "Llama 3"}
    assert openai_files == set(declared_hashes)


def recognise_as(monkeypatch, path, layout):
    """Make `path`'s content a known file of `layout`, as the real file of that encoding is."""
    monkeypatch.setitem(KNOWN_BPE_FILES, hashlib.sha256(path.read_bytes()).hexdigest(), layout)


def known_layout(name):
    return next(layout for layout in KNOWN_BPE_FILES.values() if layout.name == name)


def test_gpt2_file_gets_gpt2_split_and_its_one_special_token(tmp_path, monkeypatch):
    path = tmp_path / "gpt2.tiktoken"
    write_bpe_file(path, [b"12", b"34", b"1234"])
    with pytest.raises(TokenizerError, match="does not recognise"):
        build_tokenizer(str(path))
    recognise_as(monkeypatch, path, known_layout("r50k_base"))
    tok = build_tokenizer(str(path))
    # GPT-2 keeps a run of digits in one piece; Llama 3's split cuts it into groups of 3 ("123", "4").
    assert tok.encode("1234") == [258]
    assert tok.vocab_size == 50257 and tok.bos_id == tok.eos_id == 50256  # r50k_base's n_vocab, <|endoftext|>
    assert tok.decode([50256]) == "<|endoftext|>"
    with pytest.raises(TokenizerError, match="r50k_base, whose special tokens are fixed"):
        build_tokenizer(str(path), num_special_tokens=8)
    with pytest.raises(TokenizerError, match="r50k_base, whose split pattern .* drop the 'llama3:' prefix"):
        build_tokenizer(f"llama3:{path}")


def test_llama3_file_gets_llama3_split_and_256_specials_after_its_ranks(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.model"
    write_bpe_file(path, [b"12", b"34", b"1234"])
    stated = build_tokenizer(f"llama3:{path}")
    recognise_as(monkeypatch, path, known_layout("Llama 3"))
    tok = build_tokenizer(str(path))
    assert tok.encode("1234") == [256, 51, 52]  # "12" "3" + "4": Llama 3's split cuts digits in groups of 3
    assert tok.vocab_size == 259 + 256 and (tok.bos_id, tok.eos_id) == (259, 260)
    assert tok.decode([259 + 9]) == "<|eot_id|>"
    assert tok.fingerprint == stated.fingerprint  # the same ids as the file stated to be Llama 3's
    assert build_tokenizer(str(path), num_special_tokens=10).vocab_size == 259 + 10


def test_unknown_bpe_file_is_refused_in_one_line_with_the_ways_forward(tmp_path):
    path = tmp_path / "mystery.tiktoken"
    write_bpe_file(path, [b"ab"])
    with pytest.raises(TokenizerError) as error:
        build_tokenizer(str(path))
    message = str(error.value)
    assert "\n" not in message and "mystery.tiktoken" in message and "does not recognise" in message
    assert "tokenizer.json" in message and "scripts/train_tokenizer.py --files" in message
    assert f"tokenizer.path=llama3:{path}" in message
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="carries its own split pattern.*drop the 'llama3:' prefix"):
        build_tokenizer(f"llama3:{tmp_path / 'tokenizer.json'}")


# Computed with the code before issue 21's change (build_tokenizer("default") on REFERENCE_TEXT): the
# shipped tokenizer's ids and fingerprint must not move, or the debug run and every prepared dataset change.
REFERENCE_TEXT = "The capital of France is Paris.\n\n  Numbers 12345, émigré 日本 <|end_of_text|> don't!"
REFERENCE_IDS = [423, 295, 270, 320, 371, 99, 101, 273, 373, 97, 271, 115, 284, 10, 32, 405, 117, 370, 268, 115, 32,
                 1356, 942, 44, 32, 195, 169, 640, 103, 114, 195, 169, 32, 230, 151, 165, 230, 156, 172, 32, 60, 124,
                 101, 265, 95, 111, 102, 95, 116, 101, 120, 116, 124, 62, 327, 110, 39, 116, 33]
REFERENCE_FINGERPRINT = "be09974548af33c89ed82faa59036b193165cdd6f1c23e414342d83e1bef9dd8"


def test_default_tokenizer_ids_unchanged_and_its_file_recognised_by_content(tokenizer, tmp_path):
    assert tokenizer.encode(REFERENCE_TEXT) == REFERENCE_IDS
    assert tokenizer.fingerprint == REFERENCE_FINGERPRINT
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (2008, 2000, 2001)
    copy = tmp_path / "elsewhere.tiktoken"  # the shipped file under another name: the same tokenizer
    copy.write_bytes(DEFAULT_TOKENIZER_FILE.read_bytes())
    by_path = build_tokenizer(str(copy))
    assert by_path.encode(REFERENCE_TEXT) == REFERENCE_IDS and by_path.fingerprint == REFERENCE_FINGERPRINT
    with pytest.raises(TokenizerError, match="titanlite's default tokenizer, whose split pattern"):
        build_tokenizer(f"llama3:{copy}")
