"""Token alignment and vocabulary maps for knowledge fusion (services/tokenizer/alignment.py).

Bundled tokenizers: ``smollm2`` (byte-level BPE: ``Ġ`` spaces, CJK and emoji split into bytes)
and ``gemma3`` (``▁`` spaces, ``<0xNN>`` byte-fallback tokens, 262k tokens). Spans are UTF-8 byte
offsets; the hand-made oracles below count the bytes of each token's text.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from coolfusion.services.tokenizer.alignment import (
    VocabMap,
    align,
    align_dtw,
    align_spans,
    map_topk,
    text_tokens,
    token_spans,
    vocab_map,
)
from coolfusion.services.tokenizer.core import TokenizerError

PAIRS = [("smollm2", "gemma3"), ("gemma3", "smollm2")]

# Random text as in tests/test_tokenizer_core.py: CJK, emoji, combining marks, white space. It
# leaves out the control characters SmolLM2's vocabulary cannot encode and a literal U+2581 (the
# SentencePiece space marker); test_tokens_that_do_not_spell_the_text covers those.
PIECES = [" ", "  ", "\t", "\n", "\n\n", " \n", "\r\n", "héllo", "e\u0301", "你好", "世界", "。", "😀", "👍🏽", "🦩",
          "<div>", "'s", " 1850", "3.14", "...", " the", " The", "Multi", "-tasking", "a", "Z"]  # fmt: skip
CHARS = st.one_of(
    st.sampled_from(list("aZé ü\t\n-',.!?0123456789你世😀\ufffd<>/")),
    st.characters(codec="utf-8", max_codepoint=0x3FFFF, exclude_categories=("Cs",), exclude_characters="\x04\x06\x13\x14\x16\x1d\u2581"),
)  # fmt: skip
TEXT = st.lists(st.one_of(st.sampled_from(PIECES), CHARS), max_size=24).map("".join)
PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def toks(tokenizer_registry):
    return {t: tokenizer_registry.get(t) for t in ("smollm2", "gemma3")}


def pieces(tok, ids):
    return [tok.backend.id_to_token(i) for i in ids]


# ---- hand-made texts ---------------------------------------------------------------------------
HAND = [
    # text, smollm2 tokens, gemma3 tokens (spans follow from the tokens' byte lengths below)
    ("Hello world", ["Hello", "Ġworld"], ["Hello", "▁world"]),
    ("a  b\n\nc\n", ["a", "Ġ", "Ġb", "Ċ", "Ċ", "c", "Ċ"], ["a", "▁▁", "b", "\n\n", "c", "\n"]),
    ("你好", ["ä½", "ł", "å¥", "½"], ["你好"]),
    ("🦩", ["ðŁ", "¦", "©"], ["<0xF0>", "<0x9F>", "<0xA6>", "<0xA9>"]),
]
HAND_SPANS = {
    "Hello world": ([(0, 5), (5, 11)], [(0, 5), (5, 11)]),
    # two spaces are 2 bytes; SmolLM2 keeps the second with "b", Gemma-3 has one "▁▁" token
    "a  b\n\nc\n": ([(0, 1), (1, 2), (2, 4), (4, 5), (5, 6), (6, 7), (7, 8)], [(0, 1), (1, 3), (3, 4), (4, 6), (6, 7), (7, 8)]),
    # 你 = E4 BD A0, 好 = E5 A5 BD: SmolLM2's byte pairs cut both characters
    "你好": ([(0, 2), (2, 3), (3, 5), (5, 6)], [(0, 6)]),
    # 🦩 = F0 9F A6 A9: Gemma-3 falls back to four byte tokens
    "🦩": ([(0, 2), (2, 3), (3, 4)], [(0, 1), (1, 2), (2, 3), (3, 4)]),
}  # fmt: skip
# target token -> source token with the same start byte (smollm2 -> gemma3, gemma3 -> smollm2)
HAND_ALIGN = {
    "Hello world": ([0, 1], [0, 1]),
    "a  b\n\nc\n": ([0, 1, -1, 3, 5, 6], [0, 1, -1, 3, -1, 4, 5]),
    "你好": ([0], [0, -1, -1, -1]),
    "🦩": ([0, -1, 1, 2], [0, 2, 3]),
}


@pytest.mark.parametrize("text,smollm2,gemma3", HAND, ids=["words", "spaces-newlines", "cjk", "emoji-byte-fallback"])
def test_hand_made_spans_and_alignment(toks, text, smollm2, gemma3):
    s_ids, s_spans = text_tokens(toks["smollm2"], text)
    g_ids, g_spans = text_tokens(toks["gemma3"], text)
    assert pieces(toks["smollm2"], s_ids) == smollm2 and pieces(toks["gemma3"], g_ids) == gemma3
    assert (s_spans, g_spans) == HAND_SPANS[text]
    to_gemma, to_smollm2 = HAND_ALIGN[text]
    assert align(toks["smollm2"], toks["gemma3"], text, s_ids).source_index == to_gemma
    assert align(toks["gemma3"], toks["smollm2"], text, g_ids).source_index == to_smollm2
    assert align_spans([s for s, _ in s_spans], [s for s, _ in g_spans]) == to_gemma


def test_mixed_text_alignment(toks):
    # x | ␠🦩 | \n | ␠ | 你好 (bytes 8-14) | ␠ | ␠the | \t | end, against Gemma-3's ▁你 (7-11) and 好 (11-14)
    text = "x 🦩\n 你好  the\tend"
    s_ids, s_spans = text_tokens(toks["smollm2"], text)
    g_ids, g_spans = text_tokens(toks["gemma3"], text)
    assert [s for s, _ in s_spans] == [0, 1, 4, 5, 6, 7, 8, 10, 11, 13, 14, 15, 19, 20]
    assert [s for s, _ in g_spans] == [0, 1, 2, 3, 4, 5, 6, 7, 11, 14, 16, 19, 20]
    assert align(toks["smollm2"], toks["gemma3"], text, s_ids).source_index == [
        0,
        1,
        -1,
        -1,
        2,
        3,
        4,
        5,
        8,
        10,
        -1,
        12,
        13,
    ]


def test_dtw_hand_made():
    # Many source tokens to one target token: the path is (0,0) (1,0) (2,1) (3,1); each target
    # token takes the first source token it pairs with.
    assert align_dtw([b"Hel", b"lo", b" wor", b"ld"], [b"Hello", b" world"]) == [0, 2]
    # Costs (edit distances) here: row "the" 0 4 3 3, row " c" 3 2 1 2, row "at" 3 2 2 0,
    # row " sat" 4 1 2 2. Cumulative costs give the path (0,0) (1,1) (1,2) (2,3) (3,3): " s" pairs
    # only with " c", which " cat" already took (its distribution predicts from an earlier
    # byte), so " s" gets none; "at" takes "at".
    src = [b"the", b" c", b"at", b" sat"]
    tgt = [b"the", b" cat", b" s", b"at"]
    assert align_dtw(src, tgt) == [0, 1, -1, 2]
    assert align_dtw([], tgt) == [-1] * 4 and align_dtw(src, []) == []
    assert align_dtw(tgt, tgt) == [0, 1, 2, 3]


def test_tokens_that_do_not_spell_the_text(toks):
    # SmolLM2's vocabulary has no token for byte 0x04: its encoder drops the character, and the
    # spans come from the encoder's offsets instead (no token covers byte 1)
    ids, spans = text_tokens(toks["smollm2"], "a\x04b")
    assert pieces(toks["smollm2"], ids) == ["a", "b"] and spans == [(0, 1), (2, 3)]
    with pytest.raises(TokenizerError, match="not 'smollm2'"):
        token_spans(toks["smollm2"], ids[:1], "a\x04b")


# ---- property tests ----------------------------------------------------------------------------
@PROPERTY
@given(text=TEXT)
def test_spans_tile_the_text(toks, text):
    data = text.encode()
    for tok in toks.values():
        ids, spans = text_tokens(tok, text)
        assert [data[s:e] for s, e in spans] == [tok.token_bytes(i) for i in ids], tok.id
        assert all(s < e for s, e in spans)
        assert [s for s, _ in spans[1:]] == [e for _, e in spans[:-1]]
        if text:
            assert (spans[0][0], spans[-1][1]) == (0, len(data))
        else:
            assert spans == []
        assert token_spans(tok, ids) == spans


@PROPERTY
@given(text=TEXT)
def test_span_alignment_pairs_tokens_with_the_same_start(toks, text):
    for source, target in PAIRS:
        s_ids, s_spans = text_tokens(toks[source], text)
        _, t_spans = text_tokens(toks[target], text)
        index = align(toks[source], toks[target], text, s_ids).source_index
        starts = {start: i for i, (start, _) in reversed(list(enumerate(s_spans)))}
        assert index == [starts.get(start, -1) for start, _ in t_spans]
        aligned = [i for i in index if i >= 0]
        assert aligned == sorted(set(aligned))
        if text:
            assert index[0] == 0  # both start at byte 0


@PROPERTY
@given(text=TEXT)
def test_dtw_is_monotone_and_identity_is_one_to_one(toks, text):
    for source, target in PAIRS:
        s_ids, _ = text_tokens(toks[source], text)
        index = align(toks[source], toks[target], text, s_ids, method="dtw").source_index
        aligned = [i for i in index if i >= 0]
        assert aligned == sorted(set(aligned))
        assert len(index) == len(text_tokens(toks[target], text)[0])
        if text:
            assert index[0] == 0
    for tok in toks.values():
        ids, _ = text_tokens(tok, text)
        for method in ("span", "dtw"):
            assert align(tok, tok, text, ids, method=method).source_index == list(range(len(ids)))


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(-1, 30), st.floats(-30, 0)), max_size=12),
    targets=st.lists(st.integers(-1, 6), min_size=31, max_size=31),
)
def test_map_topk_adds_colliding_probabilities(rows, targets):
    vmap = dict(enumerate(targets))  # many-to-one, with ids that map nowhere (-1)
    ids, logprobs = [i for i, _ in rows], [v for _, v in rows]
    out_ids, out_logprobs = map_topk(ids, logprobs, vmap)
    assert len(out_ids) == len(out_logprobs) == len(ids)
    kept = [j for j in out_ids if j >= 0]
    assert len(kept) == len(set(kept)) and out_ids == kept + [-1] * (len(ids) - len(kept))
    for j in set(kept):
        want = sum(math.exp(v) for i, v in rows if i >= 0 and vmap[i] == j)
        assert math.exp(out_logprobs[out_ids.index(j)]) == pytest.approx(want, rel=1e-9, abs=1e-300)
    mass_in = sum(math.exp(v) for i, v in rows if i >= 0 and vmap[i] >= 0)
    assert sum(math.exp(v) for v in out_logprobs) == pytest.approx(mass_in, rel=1e-9, abs=1e-300)
    assert out_logprobs == sorted(out_logprobs, reverse=True)


# ---- vocabulary maps between the bundled tokenizers --------------------------------------------
def test_vocab_map_same_bytes_and_specials(toks):
    s, g = toks["smollm2"], toks["gemma3"]
    g2s, s2g = vocab_map(g, s), vocab_map(s, g)
    assert vocab_map(g, s) is g2s  # cached per pair
    sid, gid = s.backend.token_to_id, g.backend.token_to_id
    assert g2s[gid("▁the")] == sid("Ġthe") and s2g[sid("Ġthe")] == gid("▁the")
    assert g2s[gid("\n\n")] == sid("ĊĊ") and s2g[sid("ĊĊ")] == gid("\n\n")
    # a byte-fallback token and a byte-level token stand for the same byte 0xE4
    assert g2s[gid("<0xE4>")] == sid("ä") and s2g[sid("ä")] == gid("<0xE4>")
    # special tokens by role: ends of text and turns, starts, unknown; no counterpart: dropped
    assert g2s[gid("<eos>")] == g2s[gid("<end_of_turn>")] == sid("<|im_end|>")
    assert g2s[gid("<bos>")] == g2s[gid("<start_of_turn>")] == sid("<|im_start|>")
    assert g2s[gid("<unk>")] == sid("<|endoftext|>")
    assert s2g[sid("<|im_end|>")] == gid("<eos>") and s2g[sid("<|im_start|>")] == gid("<bos>")
    assert s2g[sid("<repo_name>")] == -1


def test_vocab_map_min_edit_distance(toks):
    s, g = toks["smollm2"], toks["gemma3"]
    g2s = VocabMap(g, s)  # a fresh map: filled only for the ids asked for
    assert len(g2s) == 0
    word = g.backend.token_to_id("▁Однако")
    data = g.token_bytes(word)
    assert data == " Однако".encode()
    mapped = g2s[word]
    assert len(g2s) == 1 and g2s.nearest == 1 and g2s.exact == 0
    # Oracle: brute force over every SmolLM2 token that starts with the same byte (a space)
    candidates = [i for i in range(s.vocab_size) if s.token_bytes(i)[:1] == b" " and i not in s.special_ids]
    latin = [s.token_bytes(i).decode("latin-1") for i in candidates]
    best = min(Levenshtein.distance(data.decode("latin-1"), c) for c in latin)
    assert best > 0 and s.token_bytes(mapped)[:1] == b" "
    assert Levenshtein.distance(data.decode("latin-1"), s.token_bytes(mapped).decode("latin-1")) == best
    assert process.extractOne(data.decode("latin-1"), latin, scorer=Levenshtein.distance)[1] == best
    ids = [word, g.backend.token_to_id("▁the"), word]
    assert g2s.map_ids(ids + [-1]) == [mapped, s.backend.token_to_id("Ġthe"), mapped, -1] and len(g2s) == 2


def test_map_topk_real_collision(toks):
    s, g = toks["smollm2"], toks["gemma3"]
    g2s = vocab_map(g, s)
    gid, sid = g.backend.token_to_id, s.backend.token_to_id
    ids = [gid("<eos>"), gid("▁the"), gid("<end_of_turn>"), -1]
    out_ids, out_logprobs = map_topk(ids, [math.log(0.3), math.log(0.4), math.log(0.2), -math.inf], g2s)
    assert out_ids == [sid("<|im_end|>"), sid("Ġthe"), -1, -1]
    assert [math.exp(v) for v in out_logprobs[:2]] == pytest.approx([0.5, 0.4])
    assert out_logprobs[2:] == [-math.inf, -math.inf]


def test_align_maps_rows_and_checks_input(toks):
    s, g = toks["smollm2"], toks["gemma3"]
    text = "Hello world"
    s_ids, s_spans = text_tokens(s, text)
    rows = [[s.backend.token_to_id("Ġworld"), s.backend.token_to_id("Ġthe")], [s.backend.token_to_id("<|im_end|>"), -1]]
    result = align(s, g, text, s_ids, s_spans, rows, [[-0.5, -1.5], [-0.1, -math.inf]])
    gid = g.backend.token_to_id
    assert result.target_ids == [gid("Hello"), gid("▁world")] and result.source_index == [0, 1]
    assert result.mapped_ids == [[gid("▁world"), gid("▁the")], [gid("<eos>"), -1]]
    assert result.mapped_logprobs == [[-0.5, -1.5], [-0.1, -math.inf]]
    bad = [
        (dict(method="nope"), "unknown alignment method"),
        (dict(source_spans=[(0, 5)]), "2 source tokens but 1 spans"),
        (dict(source_spans=[(0, 5), (5, 12)]), "outside the text"),
        (dict(source_spans=[(5, 11), (0, 5)]), "before span 0"),
        (dict(topk_ids=[[0]], topk_logprobs=[[0.0]]), "2 source tokens but 1 top-k"),
        (dict(topk_ids=[[0], [10**6]], topk_logprobs=[[0.0], [0.0]]), "out of range"),
        (dict(topk_ids=[[0], [1]], topk_logprobs=[[0.0], [float("nan")]]), "NaN or above 0"),
    ]
    for kwargs, message in bad:
        with pytest.raises(TokenizerError, match=message):
            align(s, g, text, s_ids, **kwargs)
    with pytest.raises(TokenizerError, match="out of range"):
        align(s, g, text, [10**6])
