"""Hugging Face tokenizer.json <-> tiktoken: ids equal to the `tokenizers` library's, or a clear refusal."""

import json

import pytest

from titanlite.data.corpus import generate_documents
from titanlite.data.hf_tokenizer import write_hf_tokenizer
from titanlite.data.tokenizer import PAT_STR, TokenizerError, build_tokenizer

tokenizers = pytest.importorskip("tokenizers")

MULTILINGUAL = [
    "def f(x):\n    return {'a': x ** 2}  # 平方\n\n\n\tif x != 0:\r\n        pass",
    "日本語のテキスト、中文文本。한국어 문장입니다.",
    "emoji 🦙🔥 family 👩‍👩‍👧 flag 🇫🇷 skin 👍🏽",
    "tabs\t\tand     spaces   \n\n\n  x  \u00a0 nbsp",
    "Ünïcödé ½ ∑ 𝔘 a\u0301 I'll don't WE'RE 1234567 3.14159",
    "العربية עברית हिन्दी ελληνικά русский",
    "  leading and trailing   ",
]


def train_byte_level_bpe(vocab_size=1200, gpt2_regex=False, ignore_merges=False,
                         specials=("<|begin_of_text|>", "<|end_of_text|>"), split_regex=PAT_STR):
    """A byte-level BPE tokenizer trained by the `tokenizers` library on the corpus and the sample's scripts."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if gpt2_regex:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(specials), show_progress=False)
    tokenizer.train_from_iterator(generate_documents(1000, seed=1) + MULTILINGUAL * 5, trainer)
    return tokenizer


def save(tokenizer, folder, config=None):
    folder.mkdir(exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


# A split regex that leaves text unmatched (digits, spaces, punctuation): HF keeps it as pieces of its own.
@pytest.mark.parametrize("gpt2_regex,ignore_merges,split_regex", [
    (False, False, PAT_STR), (False, True, PAT_STR), (True, False, PAT_STR), (False, False, r"\p{L}+")])
def test_tokenizer_json_gives_the_ids_of_the_tokenizers_library(tmp_path, gpt2_regex, ignore_merges, split_regex):
    reference = train_byte_level_bpe(gpt2_regex=gpt2_regex, ignore_merges=ignore_merges, split_regex=split_regex)
    path = save(reference, tmp_path)
    ours = build_tokenizer(str(path))
    assert ours.vocab_size == reference.get_vocab_size()
    assert (ours.bos_id, ours.eos_id) == (reference.token_to_id("<|begin_of_text|>"),
                                          reference.token_to_id("<|end_of_text|>"))
    texts = MULTILINGUAL + generate_documents(200, seed=7)
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == text
    assert any(len(ours.encode(text)) < len(text.encode()) // 2 for text in texts)  # merges are in use


def test_eos_and_bos_come_from_tokenizer_config(tmp_path):
    path = save(train_byte_level_bpe(specials=("<|endoftext|>", "<|im_end|>")), tmp_path / "a",
                {"bos_token": None, "eos_token": {"content": "<|im_end|>"}})
    tokenizer = build_tokenizer(str(path))
    assert tokenizer.bos_id == tokenizer.eos_id == tokenizer.encoding.encode_single_token("<|im_end|>")
    path = save(train_byte_level_bpe(specials=("<|endoftext|>",)), tmp_path / "b")  # GPT style: one separator
    tokenizer = build_tokenizer(str(path))
    assert tokenizer.bos_id == tokenizer.eos_id == tokenizer.encoding.encode_single_token("<|endoftext|>")
    path = save(train_byte_level_bpe(specials=("<pad>",)), tmp_path / "c")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot tell which special tokens are BOS and EOS"):
        build_tokenizer(str(path))


def test_exported_default_tokenizer_round_trips_exactly(tmp_path):
    default = build_tokenizer("default")
    write_hf_tokenizer(default.byte_pair_encoding(), tmp_path, model_max_length=256)
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in MULTILINGUAL + generate_documents(100, seed=9):
        ids = default.encode(text)
        assert reference.encode(text, add_special_tokens=False).ids == ids, text
        assert reference.decode(ids, skip_special_tokens=False) == text
    reloaded = build_tokenizer(str(tmp_path / "tokenizer.json"))
    assert reloaded.fingerprint == default.fingerprint  # the same ranks and special tokens
    assert (reloaded.bos_id, reloaded.eos_id) == (default.bos_id, default.eos_id)
    for text in MULTILINGUAL:  # the same pieces: the split regex read back runs as the original
        assert reloaded.encode(text) == default.encode(text), text


def hand_made(tmp_path, merges, extra_vocab=(), **changes):
    """A tokenizer.json with the 256 byte tokens, then `extra_vocab` (ids from 258 on), and `merges`."""
    data = json.loads(train_byte_level_bpe(vocab_size=258).to_str())
    vocab = data["model"]["vocab"]
    assert len(vocab) == 258  # 2 specials, 256 bytes, no merges
    for token in extra_vocab:
        vocab[token] = len(vocab)
    data["model"]["merges"] = merges
    for dotted, value in changes.items():
        target = data
        *parents, key = dotted.split("__")
        for parent in parents:
            target = target[parent]
        target[key] = value
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    return path


def test_merges_tiktoken_would_not_make_are_refused(tmp_path):
    # "abc" listed as a + bc, but tiktoken's BPE on "abc" merges ab (the lower id) first, then
    # ab + c: on "abc" tiktoken gives [abc] and the tokenizers library [ab, c].
    path = hand_made(tmp_path, ["a b", "b c", "a bc"], ["ab", "bc", "abc"])
    reference = tokenizers.Tokenizer.from_file(str(path))
    assert reference.encode("abc", add_special_tokens=False).tokens == ["ab", "c"]
    with pytest.raises(TokenizerError, match=r"tokenizer.json: token b'abc' \(id 260\): its merge is not the one"):
        build_tokenizer(str(path))
    # The consistent version is accepted and agrees with the library.
    path = hand_made(tmp_path, ["a b", "b c", "ab c"], ["ab", "bc", "abc"])
    reference = tokenizers.Tokenizer.from_file(str(path))
    ours = build_tokenizer(str(path))
    for text in ["abc", "abcabc bc ab", "xabcx"]:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids
    # A token no merge makes is only ever a whole piece: exact with ignore_merges, as tiktoken does it.
    path = hand_made(tmp_path, [], ["abc"], model__ignore_merges=True)
    reference = tokenizers.Tokenizer.from_file(str(path))
    ours = build_tokenizer(str(path))
    for text in ["abc", "abcabc xabc", "abc abc"]:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert ours.encode("abc abc") == [reference.token_to_id(t) for t in ["abc", "Ġ", "a", "b", "c"]]


@pytest.mark.parametrize("merges,extra,changes,message", [
    (["b a", "a b"], ["ab", "ba"], {}, "merges are not in the order of their tokens' ids"),
    (["a b"], ["ab"], {"normalizer": {"type": "NFKC"}}, "normalizer 'NFKC': tiktoken does not normalize text"),
    (["a b"], ["ab"], {"model__type": "WordPiece"}, "model type 'WordPiece': only byte-level BPE converts"),
    (["a b"], ["ab"], {"model__byte_fallback": True}, "model.byte_fallback=True"),
    (["a b"], ["ab"], {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}},
     "pre_tokenizer .*Metaspace.* is not a byte-level split"),
    (["a b"], ["ab"], {"added_tokens": [{"id": 0, "content": "<x>", "special": False}]},
     "added token '<x>' .* is not special"),
    (["x y"], [], {}, "merge 'x' \\+ 'y' makes no token of the vocab"),
    ([], ["ab"], {}, "token b'ab' \\(id 258\\): its merge is not the one tiktoken's BPE makes"),  # tiktoken makes a + b
    ([], ["abc"], {}, "ignore_merges=false and some tokens have no merge"),  # tiktoken: whole pieces only
])
def test_tokenizers_that_tiktoken_cannot_run_are_refused(tmp_path, merges, extra, changes, message):
    path = hand_made(tmp_path, merges, extra, **changes)
    with pytest.raises(TokenizerError, match=f"tokenizer file {path}: {message}.*set tokenizer.path"):
        build_tokenizer(str(path))


def test_missing_bytes_and_broken_json_are_refused(tmp_path):
    path = hand_made(tmp_path, [], [])
    data = json.loads(path.read_text())
    del data["model"]["vocab"]["Ā"]  # byte 0
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="1 of the 256 single bytes have no token"):
        build_tokenizer(str(path))
    path.write_text('{"model": ')
    with pytest.raises(TokenizerError, match="tokenizer.json: not a tokenizer.json"):
        build_tokenizer(str(path))
