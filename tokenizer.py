"""Tokenizers for tinyseek: byte-level BPE, raw bytes, or a pretrained tiktoken encoding.

A language model reads integers, not text, so a tokenizer turns a string into a
list of token ids and back.

Byte-level BPE
--------------
We start from the 256 possible byte values: any string can be written as its
UTF-8 bytes, so a vocabulary containing every single byte can encode any text
and never needs an "unknown" token. Byte-pair encoding (BPE) then *learns*
longer tokens from a training corpus: it counts every pair of adjacent tokens,
merges the most frequent pair into a new token (for example b"t" + b"h" ->
b"th"), and repeats until the vocabulary has the requested size. The order in
which merges were learned is the merge's *rank*. To encode new text we apply
the same merges again, always merging the lowest-rank pair first.

Before counting pairs, text is cut into chunks with a regular expression
(``PAT_STR``) and merges never cross a chunk boundary. This keeps tokens
meaningful: a token can be " the" or "ing", but not "e." or "d t".

Why every digit is its own chunk
--------------------------------
A tiny model cannot learn arithmetic if "48" is one token in one place and
"4" + "8" in another, or if "1234" hides its digits inside one opaque id. Our
pattern therefore puts every digit in a chunk of its own, so numbers are always
spelled out digit by digit, consistently, and "37+48" becomes
"3", "7", "+", "4", "8".

The tags used by R1-style reasoning (``<think>``, ``</think>``, ``<answer>``,
``</answer>``) are also kept in one chunk each, so BPE can learn each of them as
a single token when they are frequent in the corpus.

Why tiktoken
------------
Training the merges is done here in plain Python, so you can read every step.
*Applying* them to millions of characters is a hot loop, so the learned ranks
are handed to ``tiktoken.Encoding``, a fast Rust implementation of exactly the
same algorithm (same regex split, same lowest-rank-first merging). The same
class also serves the byte-only ``"char"`` tokenizer and the pretrained GPT-2 /
GPT-4 / GPT-4o encodings, so the rest of the code never has to care which one is
in use.

Special tokens
--------------
Every tokenizer gets two extra ids after its ordinary vocabulary: ``BOS``
(beginning of sequence) and ``EOS`` (end of sequence). They are only ever
produced on request (``encode(text, bos=True, eos=True)``); if a user writes
the string "<|eos|>" in their text it is encoded as plain characters, so text
can never inject a real special token.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import regex
import tiktoken

BOS = "<|bos|>"
EOS = "<|eos|>"

# Pre-tokenisation pattern, tried left to right at each position:
#   1. an XML-like tag such as "<think>" or " </answer>" (optional leading space)
#   2. English contractions: 's 't 'd 'm 'll 've 're
#   3. a word (run of letters) with an optional leading space
#   4. a single digit -- numbers are always split digit by digit
#   5. a run of punctuation/symbols with an optional leading space, stopping
#      before a tag so that ".</think>" still yields the tag as one chunk
#   6. whitespace; "\s+(?!\S)" leaves the last space of a run to be glued to
#      the next word, so "a   b" -> "a", "  ", " b"
PAT_STR = (
    r" ?</?[A-Za-z]+>"
    r"|'(?:[sdmt]|ll|ve|re)"
    r"| ?\p{L}+"
    r"|\p{N}"
    r"| ?(?:(?!</?[A-Za-z]+>)[^\s\p{L}\p{N}])+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# The "char" tokenizer has no merges, so how text is chunked does not change
# the result; a simple pattern that can never backtrack badly is enough.
CHAR_PAT_STR = r"\S+|\s+"

PRETRAINED = ("gpt2", "cl100k_base", "o200k_base")
VALID_NAMES = ("bpe", "char", *PRETRAINED)

_FORMAT_VERSION = 1
_REPLACEMENT = "\ufffd".encode("utf-8")


class Tokenizer:
    """A text <-> token-id converter backed by a ``tiktoken.Encoding``.

    Attributes:
        name: which kind of tokenizer this is: "bpe", "char", "gpt2",
            "cl100k_base" or "o200k_base".
        enc: the ``tiktoken.Encoding`` doing the actual work.
        bos_id, eos_id: ids of the BOS and EOS special tokens. They come right
            after the ordinary vocabulary.
        n_vocab: number of ids, special tokens included. A model's embedding
            table must have at least this many rows.

    Build one with ``get_tokenizer`` (or ``train_bpe``), and store it with
    ``to_dict`` / ``from_dict``.
    """

    def __init__(
        self,
        name: str,
        enc: tiktoken.Encoding,
        merges: list[tuple[int, int]] | None = None,
    ):
        """Wrap ``enc``. ``merges`` is the learned merge list of a "bpe" tokenizer
        (pairs of ranks, in rank order), kept so that ``to_dict`` can save it."""
        self.name = name
        self.enc = enc
        self.bos_id = enc.encode_single_token(BOS)
        self.eos_id = enc.encode_single_token(EOS)
        self.n_vocab = enc.n_vocab
        self._merges = list(merges) if merges is not None else None

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab})"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Turn ``text`` into token ids, optionally framed by BOS and/or EOS.

        Special-token strings that appear inside ``text`` (e.g. "<|eos|>") are
        encoded as ordinary characters, never as the special ids.
        """
        ids = self.enc.encode_ordinary(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids) -> str:
        """Turn token ids (a list, or a 1-D tensor / array) back into text.

        Special ids decode to their strings ("<|bos|>", "<|eos|>"). This never
        raises: byte sequences that are not valid UTF-8 (e.g. half of a
        multi-byte character) and ids outside the vocabulary (a model whose
        vocab_size is padded above n_vocab can sample those) become U+FFFD.
        """
        if hasattr(ids, "tolist"):  # torch.Tensor, numpy.ndarray
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        ids = [int(i) for i in ids]
        try:
            return self.enc.decode(ids, errors="replace")
        except (KeyError, OverflowError):
            # Slow path: at least one id is not in the vocabulary (KeyError) or
            # is negative / too large for tiktoken's 32-bit ids (OverflowError).
            parts = []
            for i in ids:
                try:
                    parts.append(self.enc.decode_single_token_bytes(i))
                except (KeyError, OverflowError):
                    parts.append(_REPLACEMENT)
            return b"".join(parts).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        """A JSON-safe description (only str / int / list / dict) of this tokenizer.

        A "bpe" tokenizer stores its regex and its merges as ``[left, right]``
        rank pairs: merge number k creates the token of rank 256 + k whose
        bytes are those of ``left`` followed by those of ``right``. Other
        tokenizers store only their name and are rebuilt from it.
        """
        d = {"name": self.name, "version": _FORMAT_VERSION}
        if self.name == "bpe":
            d["pat_str"] = self.enc._pat_str
            d["merges"] = [[a, b] for a, b in self._merges]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Tokenizer:
        """Rebuild a tokenizer saved with ``to_dict``. Raises ValueError if ``d``
        is malformed. Pretrained encodings are fetched again (see ``get_tokenizer``)."""
        if not isinstance(d, dict) or "name" not in d:
            raise ValueError(
                f"expected a tokenizer dict with a 'name' key, got {d!r:.200}"
            )
        name = d["name"]
        if name not in VALID_NAMES:
            raise ValueError(
                f"tokenizer dict has invalid name {name!r}; expected one of {', '.join(VALID_NAMES)}"
            )
        version = d.get("version", _FORMAT_VERSION)
        if version != _FORMAT_VERSION:
            raise ValueError(
                f"unsupported tokenizer dict version {version!r} (expected {_FORMAT_VERSION})"
            )
        if name == "char":
            return _char_tokenizer()
        if name in PRETRAINED:
            return _pretrained_tokenizer(name)

        pat_str = d.get("pat_str")
        merges = d.get("merges")
        if not (isinstance(pat_str, str) and pat_str and isinstance(merges, list)):
            raise ValueError(
                "a bpe tokenizer dict needs a non-empty str 'pat_str' and a list 'merges'"
            )
        vocab = [bytes([i]) for i in range(256)]
        seen = set(vocab)
        pairs = []
        for k, m in enumerate(merges):
            ok = (
                isinstance(m, (list, tuple))
                and len(m) == 2
                and all(
                    isinstance(x, int)
                    and not isinstance(x, bool)
                    and 0 <= x < len(vocab)
                    for x in m
                )
            )
            if not ok:
                raise ValueError(
                    f"bpe merge #{k} is {m!r}; expected [left, right] with ranks below {len(vocab)}"
                )
            token = vocab[m[0]] + vocab[m[1]]
            if token in seen:
                raise ValueError(
                    f"bpe merge #{k} {m!r} recreates an existing token {token!r}"
                )
            seen.add(token)
            vocab.append(token)
            pairs.append((m[0], m[1]))
        try:
            return _bpe_tokenizer(pat_str, vocab, pairs)
        except Exception as e:  # e.g. a pat_str the regex engine rejects
            raise ValueError(f"could not build bpe tokenizer from dict: {e}") from e


# ----------------------------------------------------------------------------
# Builders


def _with_specials(ranks: dict[bytes, int]) -> dict[str, int]:
    """BOS and EOS get the two ids right after the ordinary tokens."""
    n = len(ranks)
    return {BOS: n, EOS: n + 1}


def _bpe_tokenizer(
    pat_str: str, vocab: list[bytes], merges: list[tuple[int, int]]
) -> Tokenizer:
    """Serve a learned vocabulary (token bytes listed in rank order) with tiktoken."""
    ranks = {token: rank for rank, token in enumerate(vocab)}
    enc = tiktoken.Encoding(
        f"tinyseek-bpe-{len(ranks) + 2}",
        pat_str=pat_str,
        mergeable_ranks=ranks,
        special_tokens=_with_specials(ranks),
    )
    return Tokenizer("bpe", enc, merges)


def _char_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte (one per character for ASCII), plus BOS/EOS."""
    ranks = {bytes([i]): i for i in range(256)}
    enc = tiktoken.Encoding(
        "tinyseek-char",
        pat_str=CHAR_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens=_with_specials(ranks),
    )
    return Tokenizer("char", enc)


def _pretrained_tokenizer(name: str) -> Tokenizer:
    """A pretrained tiktoken encoding with our BOS/EOS appended after its last id."""
    try:
        base = tiktoken.get_encoding(name)
    except Exception as e:  # network errors differ by platform and library version
        raise RuntimeError(
            f"could not load tiktoken encoding {name!r}: it could not be downloaded and was not found "
            f"in tiktoken's cache (set TIKTOKEN_CACHE_DIR to a folder that holds it). "
            f"Use --tokenizer=bpe (the built-in default, trained on your data) or --tokenizer=char, "
            f"which need no download. Original error: {type(e).__name__}: {e}"
        ) from e
    n = base.n_vocab  # first id after everything the base encoding uses
    enc = tiktoken.Encoding(
        f"{name}-tinyseek",
        pat_str=base._pat_str,
        mergeable_ranks=base._mergeable_ranks,
        special_tokens={**base._special_tokens, BOS: n, EOS: n + 1},
    )
    return Tokenizer(name, enc)


# ----------------------------------------------------------------------------
# BPE training


def train_bpe(text: str, vocab_size: int = 512) -> Tokenizer:
    """Learn a byte-level BPE tokenizer from ``text``.

    The vocabulary holds the 256 single bytes, then up to ``vocab_size - 258``
    learned merges, then BOS and EOS, so ``n_vocab <= vocab_size``. Training
    stops early when no pair of adjacent tokens occurs at least twice.

    The result is deterministic: frequency ties are broken by the smallest
    (left, right) pair of ranks.

    How it stays fast in pure Python: the text is first split into chunks with
    ``PAT_STR`` and identical chunks are counted once (a corpus of millions of
    characters has only thousands of distinct chunks). Pair counts are kept up
    to date incrementally -- a merge only rescans the chunks that contain the
    merged pair -- and the most frequent pair is taken from a heap.
    """
    if not isinstance(text, str):
        raise TypeError(f"train_bpe needs text as a str, got {type(text).__name__}")
    if not isinstance(vocab_size, int) or vocab_size < 258:
        raise ValueError(
            f"vocab_size must be an int >= 258 (256 bytes + BOS + EOS), got {vocab_size!r}"
        )
    n_merges = vocab_size - 258

    # 1. Split into chunks and count each distinct chunk once.
    chunk_counts = Counter(regex.findall(PAT_STR, text))
    words = [list(chunk.encode("utf-8", errors="replace")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())

    # 2. Count every adjacent pair, weighted by how often its chunk occurs, and
    #    remember which chunks contain it.
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, f) in enumerate(zip(words, freqs)):
        for pair in itertools.pairwise(word):
            pair_counts[pair] += f
            where[pair].add(w)
    # Max-heap via negated counts; entries go stale when a count changes and are
    # skipped when popped (their count no longer matches).
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    vocab = [bytes([i]) for i in range(256)]  # vocab[rank] = token bytes
    rank_of = {token: rank for rank, token in enumerate(vocab)}
    merges: list[tuple[int, int]] = []

    while len(merges) < n_merges and heap:
        # 3. Pick the most frequent pair (smallest pair on ties).
        neg, pair = heapq.heappop(heap)
        count = -neg
        if pair_counts.get(pair, 0) != count:
            continue  # stale heap entry
        if count < 2:
            break  # nothing left worth merging
        a, b = pair
        token = vocab[a] + vocab[b]
        if token in rank_of:
            # The same bytes were already built from a different split (e.g.
            # "aa"+"a" vs "a"+"aa"): reuse that token, no new vocabulary entry.
            new = rank_of[token]
        else:
            new = len(vocab)
            vocab.append(token)
            rank_of[token] = new
            merges.append(pair)

        # 4. Apply the merge in every chunk containing the pair, collecting the
        #    net change of each pair count. Only pairs that involve the new
        #    token can be new to a chunk, so only those are added to `where`.
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for w in where.pop(pair):
            word, f = words[w], freqs[w]
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            if len(merged) == len(word):
                continue  # an earlier merge already removed the pair from this chunk
            for p in itertools.pairwise(word):
                delta[p] -= f
            for p in itertools.pairwise(merged):
                delta[p] += f
                if new in p:
                    where[p].add(w)
            words[w] = merged
        for p, d in delta.items():
            if d == 0:
                continue
            c = pair_counts[p] + d
            if c > 0:
                pair_counts[p] = c
                heapq.heappush(heap, (-c, p))
            else:
                del pair_counts[p]
                where.pop(p, None)

    return _bpe_tokenizer(PAT_STR, vocab, merges)


# ----------------------------------------------------------------------------
# Entry point


def _cache_path(cache_dir: str | Path, text: str, vocab_size: int) -> Path:
    data = text.encode("utf-8", errors="surrogatepass")
    digest = hashlib.sha256(data).hexdigest()[:12]
    return Path(cache_dir) / f"tokenizer-bpe-{vocab_size}-{digest}.json"


def _write_json_atomic(path: Path, obj: dict) -> None:
    """Write to a temporary file next to ``path``, then rename it into place, so a
    crash or a concurrent reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def get_tokenizer(
    name: str,
    text: str | None = None,
    cache_dir: str | Path | None = None,
    vocab_size: int = 512,
) -> Tokenizer:
    """Build the tokenizer called ``name``.

    - "bpe": byte-level BPE trained on ``text`` with at most ``vocab_size`` ids.
      With ``cache_dir``, the result is saved as
      ``cache_dir/tokenizer-bpe-{vocab_size}-{sha256(text)[:12]}.json`` and
      loaded from there next time instead of retraining.
    - "char": one token per byte (256 ids + BOS/EOS); ``text`` is ignored.
    - "gpt2", "cl100k_base", "o200k_base": pretrained tiktoken encodings plus
      BOS/EOS. They are downloaded on first use; offline, this raises a
      RuntimeError unless tiktoken's cache (TIKTOKEN_CACHE_DIR) already has them.

    Raises ValueError for an unknown name, or for "bpe" without ``text``.
    """
    if name not in VALID_NAMES:
        raise ValueError(
            f"unknown tokenizer {name!r}; valid names are: {', '.join(VALID_NAMES)}"
        )
    if name == "char":
        return _char_tokenizer()
    if name in PRETRAINED:
        return _pretrained_tokenizer(name)

    if text is None:
        raise ValueError(
            "the 'bpe' tokenizer is trained on your data: pass the training text "
            "(or use a tokenizer that needs no training, such as 'char')"
        )
    if cache_dir is None:
        return train_bpe(text, vocab_size)

    path = _cache_path(cache_dir, text, vocab_size)
    if path.exists():
        try:
            with open(path, encoding="utf-8") as f:
                return Tokenizer.from_dict(json.load(f))
        except (OSError, ValueError):
            pass  # unreadable or corrupt cache file: retrain and overwrite it
    tok = train_bpe(text, vocab_size)
    _write_json_atomic(path, tok.to_dict())
    return tok
