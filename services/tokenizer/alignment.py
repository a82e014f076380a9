"""Aligning two tokenizations of one text, and mapping a source's top-k onto a target vocabulary
(knowledge fusion, FuseLLM). Plain Python; the ``Align`` RPC in ``server.py`` is a thin wrapper.

Spans are UTF-8 byte offsets ``[start, end)`` into the text: exact also for byte-level and
byte-fallback tokens that split a character. Tokens compare as the bytes they stand for, never as
raw token strings, so SmolLM2's ``Ġthe`` and Gemma-3's ``▁the`` are the same token, and so are a
``<0xE4>`` byte token and the byte-level token of byte 0xE4.

* ``span`` (default): target token j takes the source token i that starts at the same byte, i.e.
  whose distribution is conditioned on the same text; O(n + m).
* ``dtw``: FuseLLM's dynamic time warping with the edit distance between the tokens' bytes as the
  cost; target token j takes the first source token the path pairs it with, unless that token is
  paired with an earlier target token too (its distribution then predicts from an earlier byte).

The vocabulary map takes a source id to the target id with the same bytes, else to the target
token at the minimum edit distance (MinED; ties: the smaller length difference, then the lower
id). Candidates are bucketed by first byte and length, and the search stops at the length
difference that cannot beat the best distance found. Maps fill lazily for the ids that occur and
are cached per tokenizer pair. Special tokens map by role (BOS, EOS, end and start of a turn,
PAD, UNK) or by the same token string; one with no counterpart maps to -1 and is dropped.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from .core import TokenizerCore, TokenizerError

METHODS = ("span", "dtw")

# Chat-turn markers by role, for tokenizers whose special-token attributes do not name them.
_TURN_TOKENS = {
    "eot": ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"),
    "sot": ("<|im_start|>", "<start_of_turn>", "<|start_header_id|>"),
}
# The order a special token's roles are tried in: what ends a text matters most to a student.
_ROLES = ("eos", "eot", "bos", "sot", "pad", "unk")


# ---- spans -------------------------------------------------------------------------------------
def text_tokens(tokenizer: TokenizerCore, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The tokens a model reads for ``text`` after its BOS (no special tokens), with byte spans."""
    ids = list(tokenizer.backend.encode(text, add_special_tokens=False).ids)
    return ids, token_spans(tokenizer, ids, text)


def token_spans(tokenizer: TokenizerCore, ids: Sequence[int], text: str | None = None) -> list[tuple[int, int]]:
    """Byte span of each token of ``ids`` in ``text`` (``None``: in the tokens' own bytes).

    The tokens' bytes are laid end to end; a dummy-prefix space (Llama-2 style) that is not in
    the text is not counted. Where the tokens do not spell the text (a normalizer, characters the
    vocabulary cannot encode), the spans come from the encoder's offsets of a re-encoding.
    """
    tokenizer.check_ids(ids)
    data = None if text is None else text.encode()
    if tokenizer.byte_exact:
        pieces = [len(tokenizer.token_bytes(i)) for i in ids]
        shift = 0
        if data is not None:
            spelled = tokenizer.decode_bytes(ids)
            if spelled != data and spelled.startswith(b" ") and spelled[1:] == data:
                shift = 1
            elif spelled != data:
                return _spans_from_offsets(tokenizer, ids, text)
        spans, pos = [], 0
        for length in pieces:
            start = max(0, pos - shift)
            pos += length
            spans.append((start, max(start, pos - shift)))
        return spans
    if text is None:
        raise TokenizerError(f"tokenizer {tokenizer.id!r} has no exact token bytes: give the text")
    return _spans_from_offsets(tokenizer, ids, text)


def _spans_from_offsets(tokenizer: TokenizerCore, ids: Sequence[int], text: str) -> list[tuple[int, int]]:
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    if list(enc.ids) != list(ids):
        raise TokenizerError(f"the token ids are not {tokenizer.id!r}'s tokenization of the text")
    byte_at = [0]
    for ch in text:
        byte_at.append(byte_at[-1] + len(ch.encode()))
    return [(byte_at[s], byte_at[e]) for s, e in enc.offsets]


def check_spans(starts: Sequence[int], ends: Sequence[int], n_bytes: int, what: str) -> None:
    """Spans inside the text, each start <= end, starts in order (INVALID_ARGUMENT otherwise)."""
    if len(starts) != len(ends):
        raise TokenizerError(f"{what}: {len(starts)} starts but {len(ends)} ends")
    previous = 0
    for i, (s, e) in enumerate(zip(starts, ends)):
        if not 0 <= s <= e <= n_bytes:
            raise TokenizerError(f"{what}: span {i} [{s}, {e}) is outside the text's {n_bytes} bytes")
        if s < previous:
            raise TokenizerError(f"{what}: span {i} starts at {s}, before span {i - 1}")
        previous = s


# ---- alignment ---------------------------------------------------------------------------------
def align_spans(src_starts: Sequence[int], tgt_starts: Sequence[int]) -> list[int]:
    """For each target token, the first source token with the same start byte, or -1. Both
    sequences are sorted; one merge pass."""
    out, i, n = [], 0, len(src_starts)
    for start in tgt_starts:
        while i < n and src_starts[i] < start:
            i += 1
        out.append(i if i < n and src_starts[i] == start else -1)
    return out


def align_dtw(src_tokens: Sequence[bytes], tgt_tokens: Sequence[bytes]) -> list[int]:
    """FuseLLM's DTW over the tokens' bytes with edit-distance cost; one source index per target
    index (-1: none). O(n * m) time, O(n * m) bytes of back-pointers."""
    n, m = len(src_tokens), len(tgt_tokens)
    if not n or not m:
        return [-1] * m
    cost = process.cdist([_latin(t) for t in src_tokens], [_latin(t) for t in tgt_tokens], scorer=Levenshtein.distance)
    inf = math.inf
    back = bytearray(n * m)  # 0: diagonal, 1: from (i-1, j), 2: from (i, j-1)
    prev = [inf] * m
    for i in range(n):
        row = cost[i].tolist()
        cur = [0.0] * m
        for j in range(m):
            if i == 0 and j == 0:
                cur[0] = row[0]
                continue
            diag = prev[j - 1] if j else inf
            up = prev[j]
            left = cur[j - 1] if j else inf
            if diag <= up and diag <= left:
                best, move = diag, 0
            elif up <= left:
                best, move = up, 1
            else:
                best, move = left, 2
            cur[j] = row[j] + best
            back[i * m + j] = move
        prev = cur
    pairs = []
    i, j = n - 1, m - 1
    while True:
        pairs.append((i, j))
        if i == 0 and j == 0:
            break
        move = back[i * m + j]
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    out = [-1] * m
    used_by: dict[int, int] = {}
    for i, j in reversed(pairs):
        if out[j] == -1 and used_by.setdefault(i, j) == j:
            out[j] = i
    return out


def _latin(data: bytes) -> str:
    """Bytes as a string of one character per byte, so edit distances count bytes."""
    return data.decode("latin-1")


@dataclass
class Alignment:
    """The target's tokenization of a text and, per target token, the aligned source token and
    that token's top-k row mapped onto the target vocabulary (all -1 / -inf where unaligned)."""

    target_ids: list[int]
    target_spans: list[tuple[int, int]]
    source_index: list[int]
    mapped_ids: list[list[int]]
    mapped_logprobs: list[list[float]]


def align(
    source: TokenizerCore,
    target: TokenizerCore,
    text: str,
    source_ids: Sequence[int],
    source_spans: Sequence[tuple[int, int]] | None = None,
    topk_ids: Sequence[Sequence[int]] = (),
    topk_logprobs: Sequence[Sequence[float]] = (),
    method: str = "span",
) -> Alignment:
    """Align ``source_ids`` (the source's tokens of ``text``, spans computed when not given) to
    the target's tokens of ``text`` and map the source's top-k rows (one per source token, or
    none) onto the target vocabulary. Bad input raises TokenizerError (INVALID_ARGUMENT)."""
    if method not in METHODS:
        raise TokenizerError(f"unknown alignment method {method!r}: use {' or '.join(METHODS)}")
    source.check_ids(source_ids)
    data = text.encode()
    if source_spans is None:
        source_spans = token_spans(source, source_ids, text)
    elif len(source_spans) != len(source_ids):
        raise TokenizerError(f"{len(source_ids)} source tokens but {len(source_spans)} spans")
    check_spans([s for s, _ in source_spans], [e for _, e in source_spans], len(data), "source spans")
    _check_rows(source, len(source_ids), topk_ids, topk_logprobs)
    target_ids, target_spans = text_tokens(target, text)
    if method == "span":
        index = align_spans([s for s, _ in source_spans], [s for s, _ in target_spans])
    else:
        index = align_dtw([data[s:e] for s, e in source_spans], [data[s:e] for s, e in target_spans])
    width = len(topk_ids[0]) if topk_ids else 0
    mapped_ids, mapped_logprobs = [], []
    vmap = vocab_map(source, target) if width else None
    for i in index:
        if vmap is None or i < 0:
            mapped_ids.append([-1] * width)
            mapped_logprobs.append([-math.inf] * width)
        else:
            row_ids, row_logprobs = map_topk(topk_ids[i], topk_logprobs[i], vmap, width)
            mapped_ids.append(row_ids)
            mapped_logprobs.append(row_logprobs)
    return Alignment(target_ids, target_spans, index, mapped_ids, mapped_logprobs)


def _check_rows(source: TokenizerCore, n: int, ids: Sequence[Sequence[int]], logprobs: Sequence[Sequence[float]]):
    if not ids and not logprobs:
        return
    if len(ids) != n or len(logprobs) != n:
        raise TokenizerError(f"{n} source tokens but {len(ids)} top-k id rows and {len(logprobs)} log-prob rows")
    width = len(ids[0])
    for t, (row, values) in enumerate(zip(ids, logprobs)):
        if len(row) != width or len(values) != width:
            raise TokenizerError(f"top-k row {t} has {len(row)} ids and {len(values)} log-probs, not {width}")
        source.check_ids([i for i in row if i != -1])
        if any(v != v or v > 1e-3 for v in values):
            raise TokenizerError(f"top-k row {t} has a log-prob that is NaN or above 0")


# ---- vocabulary map ----------------------------------------------------------------------------
def _roles(tokenizer: TokenizerCore) -> dict[str, int]:
    """Special token id by role, for the roles the tokenizer has."""
    hf, vocab = tokenizer.hf, tokenizer.backend
    roles = {}
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(hf, f"{role}_token_id", None)
        if token_id is not None and token_id >= 0:
            roles[role] = token_id
    for role, names in _TURN_TOKENS.items():
        for name in names:
            token_id = vocab.token_to_id(name)
            if token_id is not None:
                roles[role] = token_id
                break
    return roles


@dataclass
class _TargetIndex:
    """A target vocabulary indexed by bytes: exact lookups and MinED buckets."""

    by_bytes: dict[bytes, int]
    # first byte -> length -> (token bytes as latin-1 strings, ids), both in id order
    buckets: dict[int, dict[int, tuple[list[str], list[int]]]]
    roles: dict[str, int]

    @classmethod
    def build(cls, target: TokenizerCore) -> _TargetIndex:
        by_bytes: dict[bytes, int] = {}
        buckets: dict[int, dict[int, tuple[list[str], list[int]]]] = {}
        for token_id in range(target.vocab_size):
            data = target.token_bytes(token_id)
            if not data or token_id in target.special_ids or data in by_bytes:
                continue
            by_bytes[data] = token_id
            strings, ids = buckets.setdefault(data[0], {}).setdefault(len(data), ([], []))
            strings.append(_latin(data))
            ids.append(token_id)
        return cls(by_bytes, buckets, _roles(target))

    def nearest(self, data: bytes) -> int:
        """The MinED neighbour of ``data`` among tokens with its first byte (any first byte when
        none has it)."""
        lengths = self.buckets.get(data[0])
        if lengths is None:
            lengths = {}
            for bucket in self.buckets.values():
                for length, (strings, ids) in bucket.items():
                    merged = lengths.setdefault(length, ([], []))
                    merged[0].extend(strings)
                    merged[1].extend(ids)
        query, size = _latin(data), len(data)
        best = (math.inf, math.inf, -1)  # (distance, length difference, id)
        longest = max(lengths)
        for delta in range(0, max(size, longest) + 1):
            if delta > best[0]:
                break  # a length difference bounds the distance from below
            for length in {size - delta, size + delta}:
                if length not in lengths:
                    continue
                strings, ids = lengths[length]
                cutoff = None if best[0] == math.inf else int(best[0])
                found = process.extractOne(query, strings, scorer=Levenshtein.distance, score_cutoff=cutoff)
                if found is not None:
                    candidate = (found[1], delta, ids[found[2]])
                    best = min(best, candidate)
        return best[2]


_INDEXES: dict[TokenizerCore, _TargetIndex] = {}
_MAPS: dict[tuple[TokenizerCore, TokenizerCore], VocabMap] = {}
_LOCK = threading.Lock()


def _target_index(target: TokenizerCore) -> _TargetIndex:
    with _LOCK:
        index = _INDEXES.get(target)
    if index is None:
        index = _TargetIndex.build(target)
        with _LOCK:
            index = _INDEXES.setdefault(target, index)
    return index


@dataclass
class VocabMap:
    """Source id -> target id, filled lazily for the ids asked for (see the module docstring)."""

    source: TokenizerCore
    target: TokenizerCore
    _map: dict[int, int] = field(default_factory=dict)
    exact: int = 0  # ids mapped so far to a token with the same bytes
    nearest: int = 0  # ... to a MinED neighbour

    def __post_init__(self):
        self._index = _target_index(self.target)
        self._special = self._special_map()

    def _special_map(self) -> dict[int, int]:
        out = {}
        source_roles = _roles(self.source)
        for token_id in self.source.special_ids | set(source_roles.values()):
            name = self.source.backend.id_to_token(token_id)
            same = self.target.backend.token_to_id(name) if name is not None else None
            mine = [role for role in _ROLES if source_roles.get(role) == token_id]
            theirs = [self._index.roles[role] for role in mine if role in self._index.roles]
            out[token_id] = theirs[0] if theirs else same if same is not None else -1
        return out

    def __getitem__(self, source_id: int) -> int:
        mapped = self._map.get(source_id)
        if mapped is None:
            mapped = self._compute(source_id)
            self._map[source_id] = mapped
        return mapped

    def _compute(self, source_id: int) -> int:
        if source_id in self._special:
            return self._special[source_id]
        data = self.source.token_bytes(source_id)
        if not data:
            return -1
        exact = self._index.by_bytes.get(data)
        if exact is not None:
            self.exact += 1
            return exact
        self.nearest += 1
        return self._index.nearest(data)

    def map_ids(self, ids: Sequence[int]) -> list[int]:
        return [self[i] if i >= 0 else -1 for i in ids]

    def __len__(self) -> int:
        return len(self._map)


def vocab_map(source: TokenizerCore, target: TokenizerCore) -> VocabMap:
    """The map of one tokenizer pair, shared by every caller in the process."""
    key = (source, target)
    with _LOCK:
        found = _MAPS.get(key)
    if found is None:
        made = VocabMap(source, target)
        with _LOCK:
            found = _MAPS.setdefault(key, made)
    return found


def map_topk(
    ids: Sequence[int], logprobs: Sequence[float], vmap: VocabMap, width: int | None = None
) -> tuple[list[int], list[float]]:
    """One top-k row mapped onto the target vocabulary: the probabilities of source ids that map
    to the same target id are added; ids mapped to -1 (and input padding, id -1) are dropped.
    Sorted by probability (then id), padded to ``width`` (default ``len(ids)``) with -1 / -inf."""
    merged: dict[int, float] = {}
    for token_id, logprob in zip(ids, logprobs):
        target_id = vmap[token_id] if token_id >= 0 else -1
        if target_id < 0:
            continue
        merged[target_id] = _logaddexp(merged[target_id], logprob) if target_id in merged else logprob
    rows = sorted(merged.items(), key=lambda item: (-item[1], item[0]))
    width = len(ids) if width is None else width
    rows = rows[:width] + [(-1, -math.inf)] * (width - len(rows))
    return [i for i, _ in rows], [lp for _, lp in rows]


def _logaddexp(a: float, b: float) -> float:
    high, low = (a, b) if a >= b else (b, a)
    if low == -math.inf:
        return high
    return high + math.log1p(math.exp(low - high))
