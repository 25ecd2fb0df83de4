"""Tests for tokenizer.py: byte-level BPE, the byte-only "char" tokenizer, and
the pretrained tiktoken encodings (mocked, so no network is needed).

Run from the repository root:  python -m pytest tests/test_tokenizer.py -q
"""

import json
import random
from collections import Counter

import numpy as np
import pytest
import regex
import tiktoken

import tokenizer as tk
from tokenizer import BOS, EOS, Tokenizer, get_tokenizer, train_bpe

R1_TEXT = "User: 37+48\nAssistant: <think>7+8=15</think><answer>85</answer>"

ROUND_TRIP_TEXTS = [
    "",
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "line one\nline two\n\n\ttabbed   spaced  \r\n",
    "naïve café, Straße, 東京, Привет, مرحبا",
    "emoji 😀🚀👩‍👩‍👧 and flags 🇫🇷",
    "don't won't it's we've they're I'll",
    "3.14159 + 2.71828 = 5.85987; 1,000,000 (x^2)",
    R1_TEXT,
    "x.</think>  <answer> 42 </answer>",
    "<|bos|>not special<|eos|>",
]


def make_corpus(n: int = 400, seed: int = 0) -> str:
    """A small R1-style arithmetic corpus with some English mixed in."""
    rng = random.Random(seed)
    words = [
        "the",
        "a",
        "model",
        "thinks",
        "about",
        "each",
        "digit",
        "and",
        "then",
        "writes",
    ]
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(
            f"User: {a}+{b}\nAssistant: <think>{a}+{b}={a + b}</think><answer>{a + b}</answer>\n"
        )
        lines.append(" ".join(rng.choices(words, k=10)) + ".\n")
    return "".join(lines)


CORPUS = make_corpus()


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=512)


@pytest.fixture(scope="module")
def char():
    return get_tokenizer("char")


def assert_json_types(obj):
    """Only str / int / list / dict (and bool/None) anywhere inside obj: no bytes, tuples, floats."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str)
            assert_json_types(v)
    elif isinstance(obj, list):
        for v in obj:
            assert_json_types(v)
    else:
        assert obj is None or isinstance(obj, (str, int, bool)), type(obj)


# ----------------------------------------------------------------------------
# Round trips and basic properties


@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(kind, text, bpe, char):
    tok = bpe if kind == "bpe" else char
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert all(0 <= i < tok.bos_id for i in ids)
    assert tok.decode(ids) == text


def test_uses_tiktoken(bpe, char):
    for tok in (bpe, char):
        assert isinstance(tok, Tokenizer)
        assert isinstance(tok.enc, tiktoken.Encoding)


def test_char_is_one_token_per_byte(char):
    assert char.name == "char"
    assert char.n_vocab == 258
    text = "Hello, world! 123"
    assert char.encode(text) == list(text.encode("ascii"))
    assert len(char.encode("é")) == 2  # two UTF-8 bytes
    # never fails, even on a lone surrogate or control characters
    assert char.decode(char.encode("a\ud800b\x00\x1f")) == "a\ufffdb\x00\x1f"


def test_digits_are_single_tokens(bpe):
    assert len(bpe.encode("12345")) == 5
    digit_ids = {bpe.encode(str(d))[0] for d in range(10)}
    assert len(digit_ids) == 10
    rng = random.Random(1)
    samples = [str(i) for i in range(1000)] + [
        str(rng.randint(0, 10**30)) for _ in range(50)
    ]
    for s in samples:
        ids = bpe.encode(s)
        assert len(ids) == len(s)
        assert [bpe.decode([i]) for i in ids] == list(s)
    # inside text too: a token that contains a digit is that single digit
    ids = bpe.encode(R1_TEXT)
    pieces = [bpe.decode([i]) for i in ids]
    for piece in pieces:
        if any(c.isdigit() for c in piece):
            assert len(piece) == 1, pieces
    assert pieces.count("8") == 3


def test_pattern_splits_digits_and_tags():
    chunks = regex.findall(
        tk.PAT_STR, "Assistant: <think>37+48=85.</think><answer>85</answer>"
    )
    assert chunks == [
        "Assistant", ":", " <think>", "3", "7", "+", "4", "8", "=", "8", "5", ".",
        "</think>", "<answer>", "8", "5", "</answer>",
    ]  # fmt: skip


def test_r1_tags_become_single_tokens(bpe):
    for tag in ["</think>", "<answer>", "</answer>", " <think>"]:
        assert len(bpe.encode(tag)) == 1, tag


def test_specials(bpe, char):
    for tok in (bpe, char):
        assert tok.bos_id != tok.eos_id
        assert {tok.bos_id, tok.eos_id} == {tok.n_vocab - 2, tok.n_vocab - 1}
        ids = tok.encode("hi", bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert ids[1:-1] == tok.encode("hi")
        assert tok.encode("hi", bos=True) == [tok.bos_id, *tok.encode("hi")]
        assert tok.encode("hi", eos=True) == [*tok.encode("hi"), tok.eos_id]
        assert tok.decode(ids) == f"{BOS}hi{EOS}"


def test_special_strings_in_text_stay_plain(bpe, char):
    for tok in (bpe, char):
        text = f"{BOS}hello{EOS} <|endoftext|>"
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text


def test_decode_accepts_arrays_and_never_raises(bpe):
    torch = pytest.importorskip("torch")
    ids = bpe.encode(R1_TEXT)
    assert bpe.decode(np.array(ids)) == R1_TEXT
    assert bpe.decode(torch.tensor(ids)) == R1_TEXT
    assert bpe.decode(torch.tensor(ids, dtype=torch.int32)) == R1_TEXT
    # half of a two-byte character is not valid UTF-8
    assert bpe.decode([0xC3]) == "\ufffd"
    # ids outside the vocabulary (e.g. from a padded embedding table)
    out = bpe.decode([bpe.encode("a")[0], bpe.n_vocab + 5, -1, 2**40])
    assert out.startswith("a") and "\ufffd" in out


# ----------------------------------------------------------------------------
# BPE training


def reference_train(text: str, vocab_size: int) -> list[list[int]]:
    """Textbook BPE: recount every pair from scratch before each merge."""
    words = Counter(regex.findall(tk.PAT_STR, text))
    seqs = {w: list(w.encode("utf-8")) for w in words}
    vocab = [bytes([i]) for i in range(256)]
    rank_of = {t: i for i, t in enumerate(vocab)}
    merges = []
    while len(merges) < vocab_size - 258:
        counts = Counter()
        for w, f in words.items():
            for p in zip(seqs[w], seqs[w][1:]):
                counts[p] += f
        if not counts:
            break
        pair = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        if counts[pair] < 2:
            break
        token = vocab[pair[0]] + vocab[pair[1]]
        if token not in rank_of:
            rank_of[token] = len(vocab)
            vocab.append(token)
            merges.append(list(pair))
        new = rank_of[token]
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == pair:
                    out.append(new)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


@pytest.mark.parametrize(
    "text",
    [CORPUS[:3000], "aaaaaaa aaaa aaa aa a aaaaaaa", "abababab cdcdcd abcdabcd " * 5],
)
def test_training_matches_reference(text):
    assert train_bpe(text, 300).to_dict()["merges"] == reference_train(text, 300)


def test_deterministic():
    a = train_bpe(CORPUS, 400).to_dict()
    b = train_bpe(CORPUS, 400).to_dict()
    assert a == b


def test_vocab_bounded_and_compresses(bpe):
    assert bpe.n_vocab <= 512
    for vs in (258, 260, 300):
        tok = train_bpe(CORPUS, vs)
        assert tok.n_vocab <= vs
        assert tok.decode(tok.encode(CORPUS)) == CORPUS
    assert train_bpe(CORPUS, 258).to_dict()["merges"] == []
    n_bytes = len(CORPUS.encode("utf-8"))
    assert len(bpe.encode(CORPUS)) < 0.5 * n_bytes


def test_stops_early_when_no_pair_repeats():
    tok = train_bpe("abcdefg", 1000)
    assert tok.to_dict()["merges"] == []
    assert tok.n_vocab == 258
    assert train_bpe("", 512).n_vocab == 258


def test_bad_vocab_size():
    with pytest.raises(ValueError):
        train_bpe("abc", 100)


# ----------------------------------------------------------------------------
# Serialization and caching


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_dict_json_round_trip(kind, bpe, char):
    tok = bpe if kind == "bpe" else char
    d = tok.to_dict()
    assert_json_types(d)
    tok2 = Tokenizer.from_dict(json.loads(json.dumps(d)))
    assert tok2.name == tok.name
    assert tok2.to_dict() == d
    assert (tok2.n_vocab, tok2.bos_id, tok2.eos_id) == (
        tok.n_vocab,
        tok.bos_id,
        tok.eos_id,
    )
    for text in ROUND_TRIP_TEXTS + [CORPUS[:2000]]:
        assert tok2.encode(text, bos=True, eos=True) == tok.encode(
            text, bos=True, eos=True
        )


def test_dict_survives_weights_only_checkpoint(bpe, tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "ckpt.pt"
    torch.save({"tokenizer": bpe.to_dict()}, path)
    d = torch.load(path, weights_only=True)["tokenizer"]
    assert Tokenizer.from_dict(d).encode(R1_TEXT) == bpe.encode(R1_TEXT)


def test_cache_written_and_reused(tmp_path, monkeypatch):
    text = CORPUS[:5000]
    tok = get_tokenizer("bpe", text=text, cache_dir=tmp_path / "cache", vocab_size=300)
    files = list((tmp_path / "cache").iterdir())
    assert [f.name for f in files] == [
        tk._cache_path(tmp_path / "cache", text, 300).name
    ]
    assert files[0].name.startswith("tokenizer-bpe-300-") and files[0].suffix == ".json"
    assert json.loads(files[0].read_text()) == tok.to_dict()

    def no_training(*args, **kwargs):
        raise AssertionError("should have loaded the cached tokenizer")

    monkeypatch.setattr(tk, "train_bpe", no_training)
    tok2 = get_tokenizer("bpe", text=text, cache_dir=tmp_path / "cache", vocab_size=300)
    assert tok2.to_dict() == tok.to_dict()
    # a different text or vocab size is a different cache entry
    with pytest.raises(AssertionError):
        get_tokenizer(
            "bpe", text=text + "!", cache_dir=tmp_path / "cache", vocab_size=300
        )
    with pytest.raises(AssertionError):
        get_tokenizer("bpe", text=text, cache_dir=tmp_path / "cache", vocab_size=301)


def test_corrupt_cache_is_retrained(tmp_path):
    text = CORPUS[:2000]
    path = tk._cache_path(tmp_path, text, 300)
    path.write_text("{not json")
    tok = get_tokenizer("bpe", text=text, cache_dir=tmp_path, vocab_size=300)
    assert json.loads(path.read_text()) == tok.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left


@pytest.mark.parametrize(
    "d",
    [
        None,
        [],
        {},
        {"name": "nope"},
        {"name": "bpe"},
        {"name": "bpe", "pat_str": tk.PAT_STR},
        {"name": "bpe", "pat_str": 5, "merges": []},
        {"name": "bpe", "pat_str": "(", "merges": []},
        {"name": "bpe", "pat_str": tk.PAT_STR, "merges": [[1]]},
        {"name": "bpe", "pat_str": tk.PAT_STR, "merges": [[0, 256]]},
        {"name": "bpe", "pat_str": tk.PAT_STR, "merges": [["a", "b"]]},
        {"name": "bpe", "pat_str": tk.PAT_STR, "merges": [[True, 1]]},
        {"name": "bpe", "pat_str": tk.PAT_STR, "merges": [[97, 98], [97, 98]]},
        {"name": "char", "version": 99},
    ],
)
def test_malformed_dict(d):
    with pytest.raises(ValueError):
        Tokenizer.from_dict(d)


# ----------------------------------------------------------------------------
# get_tokenizer and the pretrained encodings


def test_unknown_name():
    with pytest.raises(ValueError, match="bpe.*char.*gpt2.*cl100k_base.*o200k_base"):
        get_tokenizer("sentencepiece")


def test_bpe_needs_text():
    with pytest.raises(ValueError, match="text"):
        get_tokenizer("bpe")


def test_get_tokenizer_bpe_without_cache():
    tok = get_tokenizer("bpe", text=CORPUS[:2000], vocab_size=300)
    assert tok.name == "bpe" and tok.n_vocab <= 300


@pytest.mark.parametrize("name", tk.PRETRAINED)
def test_pretrained_offline_error(name, monkeypatch):
    def offline(name):
        raise ConnectionError("Failed to resolve host")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR") as info:
        get_tokenizer(name)
    assert "--tokenizer=bpe" in str(info.value) and "--tokenizer=char" in str(
        info.value
    )
    with pytest.raises(RuntimeError):
        Tokenizer.from_dict({"name": name})


def test_pretrained_gets_bos_eos_after_its_ids(monkeypatch):
    # A stand-in for a downloaded encoding: 256 bytes + one merge + its own special token.
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"ab"] = 256
    fake = tiktoken.Encoding(
        "fake",
        pat_str=tk.PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 257},
    )
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    tok = get_tokenizer("gpt2")
    assert (tok.name, tok.bos_id, tok.eos_id, tok.n_vocab) == ("gpt2", 258, 259, 260)
    assert tok.encode("ab") == [256]
    assert tok.encode("<|endoftext|>") != [257]  # specials in text stay plain text
    assert tok.decode(tok.encode("ab", bos=True, eos=True)) == f"{BOS}ab{EOS}"
    assert tok.to_dict() == {"name": "gpt2", "version": 1}
    assert Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))).encode("abc") == [
        256,
        99,
    ]
