"""Tokenizer core: word starts, common boundaries, continuation encoding, decoding in context.

Tokenizers under test:

* ``smollm2`` (bundled): ByteLevel BPE with the GPT-2 regex pre-tokenizer -> rule ``pretokenizer``.
* ``gemma3`` (bundled): spaces normalised to ``▁``, no pre-split -> rule ``metaspace``.
* ``llama3_bpe`` (built here): byte-level BPE with Llama-3's split regex (digits grouped 1-3,
  ``-tasking`` one pre-token) -> rule ``pretokenizer``.
* ``spm_bpe`` (built here): SentencePiece-style BPE with byte fallback, Metaspace pre-tokenizer
  ``prepend_scheme="first"``, ``split=False`` (Llama-2 style dummy prefix, no pre-split) -> ``metaspace``.
* ``spm_unigram`` (built here): Unigram with byte fallback, Metaspace ``prepend_scheme="first"``,
  ``split=True`` -> rule ``pretokenizer`` (words start at ``▁``).
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from coolfusion.services.tokenizer.core import (
    IncrementalDecoder,
    TokenizerCore,
    TokenizerError,
    TokenizerRegistry,
    UnknownTokenizerError,
    split_complete_utf8,
)

# --------------------------------------------------------------------------------------------
# Tokenizers built by the tests
# --------------------------------------------------------------------------------------------

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = [
    "Multi-tasking isn't easy, but we'll manage: 1850 people met in 2024.",
    "The quick brown fox jumps over the lazy dog. <div>Hello</div> </a>",
    "Héllo wörld, ça va? Ñandú, señor! naïve café résumé",
    "你好世界，中文文本。日本語のテキスト。 😀 👍 🎉",
    "def f(x):\n\treturn x * 2  # comment\n\nprint(f(21))",
    "Numbers: 3.14159, 2718281828, 1,000,000 and 42% off!",
    "  Indented   text\twith\ttabs\nand\n\nnewlines.\r\n",
] * 20


def _with_byte_tokens(tok):
    """Add the 256 ``<0xXX>`` pieces byte fallback needs (SentencePiece keeps them in the vocab)."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    model = spec["model"]
    if model["type"] == "BPE":
        for b in range(256):
            model["vocab"].setdefault(f"<0x{b:02X}>", len(model["vocab"]))
    else:
        have = {piece for piece, _ in model["vocab"]}
        model["vocab"] += [[f"<0x{b:02X}>", -20.0] for b in range(256) if f"<0x{b:02X}>" not in have]
    model["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec))


def build_llama3_bpe():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def build_spm_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok = _with_byte_tokens(tok)
    # Llama-2's decoder: the dummy-prefix space is stripped from the start of the text.
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_spm_unigram():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok = _with_byte_tokens(tok)
    tok.decoder = decoders.Sequence(
        [decoders.Metaspace(replacement="▁", prepend_scheme="first"), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


BUILT = {"llama3_bpe": build_llama3_bpe, "spm_bpe": build_spm_bpe, "spm_unigram": build_spm_unigram}
ALL_IDS = ["smollm2", "gemma3", *BUILT]
# Tokenizers whose decoder drops the dummy-prefix space at the start of the text (Llama-2 style).
DUMMY_PREFIX = {"spm_bpe", "spm_unigram"}


@pytest.fixture(scope="session")
def registry(tokenizer_registry) -> TokenizerRegistry:
    """The bundled tokenizers plus the ones trained here (training takes well under a second)."""
    reg = TokenizerRegistry(tokenizer_registry)
    for name, build in BUILT.items():
        reg.add(TokenizerCore(name, build()))
    return reg


def words(tok: TokenizerCore, text: str) -> list[str]:
    starts = tok.word_starts(text)
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


EXAMPLE = "Multi-tasking isn't 1850 héllo 你好世界\n\nOK"

# --------------------------------------------------------------------------------------------
# Loading and rules
# --------------------------------------------------------------------------------------------


def test_rules_and_info(registry):
    rules = {t.id: t.boundary_rule for t in registry}
    assert rules == {
        "smollm2": "pretokenizer",
        "gemma3": "metaspace",
        "llama3_bpe": "pretokenizer",
        "spm_bpe": "metaspace",
        "spm_unigram": "pretokenizer",
    }
    for tok in registry:
        assert tok.byte_exact, tok.id
        info = tok.info()
        assert info["vocab_size"] == tok.vocab_size > 0
        assert info["eos_token_id"] >= 0 and info["bos_token_id"] >= 0
    assert registry.get("gemma3").adds_bos and not registry.get("smollm2").adds_bos
    assert all(registry.get(t).adds_bos for t in BUILT)


def test_unknown_tokenizer(registry):
    with pytest.raises(UnknownTokenizerError, match="unknown tokenizer 'nope'"):
        registry.get("nope")
    with pytest.raises(UnknownTokenizerError):
        registry.common_boundary("", "a b c", ["smollm2", "nope"])
    with pytest.raises(TokenizerError, match="at least one"):
        registry.common_boundary("", "a b c", [])


def test_smollm2_words(registry):
    assert words(registry.get("smollm2"), EXAMPLE) == [
        "Multi", "-", "tasking", " isn", "'t", " 1850", " héllo", " 你好世界", "\n", "\n", "OK",
    ]  # fmt: skip


def test_gemma_words_keep_multi_tasking(registry):
    assert words(registry.get("gemma3"), EXAMPLE) == [
        "Multi-tasking", " isn't", " 1850", " héllo", " 你好世界", "\n\n", "OK",
    ]  # fmt: skip


def test_llama3_words(registry):
    """Llama-3 regex: `-tasking` is one word, digits group by 3, the space before digits is alone."""
    assert words(registry.get("llama3_bpe"), EXAMPLE) == [
        "Multi", "-tasking", " isn", "'t", " ", "185", "0", " héllo", " 你好世界", "\n\n", "OK",
    ]  # fmt: skip


def test_sentencepiece_words(registry):
    assert words(registry.get("spm_unigram"), "Multi-tasking isn't 1850") == ["Multi-tasking", " isn't", " 1850"]
    assert words(registry.get("spm_bpe"), EXAMPLE) == words(registry.get("gemma3"), EXAMPLE)


def segments(registry: TokenizerRegistry, ids, context: str, text: str) -> list[str]:
    """Cut ``text`` at successive common boundaries (one-shot: the whole remaining text is known)."""
    out = []
    while text:
        b = registry.common_boundary(context, text, ids)
        if b is None:
            out.append(text)
            break
        assert 0 < b < len(text)
        out.append(text[:b])
        context, text = context + text[:b], text[b:]
    return out


def test_common_segments_bundled(registry):
    assert segments(registry, ["smollm2", "gemma3"], "", EXAMPLE) == [
        "Multi-tasking", " isn't", " 1850", " héllo", " 你好世界", "\n\n", "OK",
    ]  # fmt: skip


def test_paper_example_llama3_and_sentencepiece(registry):
    """Paper 2.2: Llama-3 splits `Multi-tasking` in two, SentencePiece keeps one word."""
    assert words(registry.get("llama3_bpe"), "Multi-tasking is")[:2] == ["Multi", "-tasking"]
    assert registry.common_boundary("", "Multi-tasking is", ["llama3_bpe", "spm_bpe"]) == len("Multi-tasking")
    assert registry.common_boundary("", "Multi-tasking is", ["llama3_bpe"]) == len("Multi")
    # Llama-3 digits: 185|0 are two words for llama3 alone, but not for smollm2.
    assert registry.common_boundary("x ", "1850 y", ["llama3_bpe"]) == 3
    assert registry.common_boundary("x ", "1850 y", ["llama3_bpe", "smollm2"]) == 4


def test_boundary_needs_a_following_character(registry):
    ids = ["smollm2", "gemma3"]
    assert registry.common_boundary("", "Hello", ids) is None
    assert registry.common_boundary("", "Hello ", ids) is None  # the next word has not begun
    assert registry.common_boundary("", "Hello \n\t ", ids) is None  # white space only: not yet
    assert registry.common_boundary("", "Hello w", ids) == 5
    assert registry.common_boundary("", "", ids) is None
    assert registry.common_boundary("", "a", ids) is None
    # context words are seen in context: "lo" continues "Hel", so 0 is never returned.
    assert registry.common_boundary("Hel", "lo world", ids) == 2
    assert registry.common_boundary("Hello", " world", ids) is None  # 0 is not a candidate
    assert registry.common_boundary("Hello", " world x", ids) == 6
    assert registry.common_boundary("", "Hello world x", ids, allowed_offsets=[11]) == 11
    assert registry.common_boundary("", "Hello world x", ids, allowed_offsets=[3]) is None


def test_boundary_waits_for_the_end_of_white_space(registry):
    r"""Found by the property test: Llama-3's `\s*[\r\n]+` makes "\n " two words but "\n \n" one,
    so a boundary before trailing white space could move; it is returned only once a
    non-white-space character follows."""
    llama = registry.get("llama3_bpe")
    assert 6 in llama.word_starts("Multi\n ") and 6 not in llama.word_starts("Multi\n \n")
    assert registry.common_boundary("", "Multi\n ", ["llama3_bpe"]) is None
    assert registry.common_boundary("", "Multi\n \nx", ["llama3_bpe"]) == 5
    smol = registry.get("smollm2")  # GPT-2's `\s+(?!\S)`: the run's last space joins the next word
    assert smol.word_starts("a  ") == [0, 1] and smol.word_starts("a  b") == [0, 1, 2]
    assert registry.common_boundary("a", "  ", ["smollm2"]) is None
    assert registry.common_boundary("a", "  b", ["smollm2"]) == 1


def test_newline_rule(registry):
    """Metaspace rule: a run of newlines is a word of its own; tabs stay inside words."""
    gemma = registry.get("gemma3")
    assert words(gemma, "a\n\n\nb c") == ["a", "\n\n\n", "b", " c"]
    assert words(gemma, "x\n y\tz") == ["x", "\n", " y\tz"]
    assert words(gemma, "\n\nHi") == ["\n\n", "Hi"]
    # Gemma has no token mixing newlines with other characters, so these starts are token starts.
    for text in ["Hello\n\nworld", "a\nb\n\n\nc  \n d", "<div>\n</div>\n\t\tx", "1\n2\n\n3"]:
        token_starts = {s for s, _ in gemma.encode(text).spans}
        assert set(gemma.word_starts(text)) <= token_starts, text
    # The common boundary lands after the newline run for the bundled pair.
    assert registry.common_boundary("", "a\n\nb", ["smollm2", "gemma3"]) == 1
    assert registry.common_boundary("a", "\n\nb c", ["smollm2", "gemma3"]) == 2
    assert segments(registry, ["smollm2", "gemma3"], "", "x\n\n\ny") == ["x", "\n\n\n", "y"]


def test_literal_replacement_character_is_ordinary_text(registry, monkeypatch):
    """A genuine U+FFFD is ordinary text: each tokenizer's word starts are computed once per
    boundary search, over the text once (linear), however many U+FFFD it holds. (The time of
    such a search is printed by ``bench/tokenizer_rpc.py``.)"""
    ids = ["smollm2", "gemma3"]
    scanned: dict[str, list[int]] = {t: [] for t in ids}
    for t in ids:
        tok = registry.get(t)
        monkeypatch.setattr(
            tok, "word_starts", lambda text, _t=t, _f=tok.word_starts: scanned[_t].append(len(text)) or _f(text)
        )
    text = ("ab\ufffd " * 2000) + "end"
    assert registry.common_boundary("", text, ids) == 3
    assert scanned == {t: [len(text)] for t in ids}
    assert segments(registry, ids, "", "x\ufffd\ufffd y \ufffd") == ["x\ufffd\ufffd", " y", " \ufffd"]


# --------------------------------------------------------------------------------------------
# Encode / decode
# --------------------------------------------------------------------------------------------


def test_continuation_encoding(registry):
    gemma, spm, llama = registry.get("gemma3"), registry.get("spm_bpe"), registry.get("llama3_bpe")
    full = gemma.encode("world")
    assert full.ids[0] == gemma.bos_token_id
    cont = gemma.encode("world", continuation=True)
    assert gemma.bos_token_id not in cont.ids and cont.ids == full.ids[1:]
    # Llama-2 style dummy prefix: "world" -> [<s>, ▁world...] but the continuation has no ▁.
    full = spm.encode("world")
    assert full.ids[0] == spm.bos_token_id and full.tokens[1].startswith("▁")
    cont = spm.encode("world", continuation=True)
    assert spm.bos_token_id not in cont.ids and not cont.tokens[0].startswith("▁")
    assert spm.decode(cont.ids, spm.encode("Hello").ids) == ("world", 0)
    assert spm.decode(spm.encode(" world", continuation=True).ids, spm.encode("Hello").ids) == (" world", 0)
    assert llama.encode("x y", continuation=True).ids == llama.encode("x y").ids[1:]
    for tok in registry:
        assert tok.encode_ids("a b", continuation=True) == tok.encode("a b", continuation=True).ids
        assert tok.encode_ids("a b", continuation=False) == tok.encode("a b").ids


def test_encode_spans(registry):
    for tok in registry:
        enc = tok.encode(EXAMPLE, continuation=True)
        assert len(enc.ids) == len(enc.tokens) == len(enc.spans)
        assert all(0 <= s <= e <= len(EXAMPLE) for s, e in enc.spans)
        assert enc.spans[-1][1] == len(EXAMPLE)


def test_decode_matches_hf(registry):
    for tok in registry:
        ids = tok.encode(EXAMPLE).ids
        assert tok.decode(ids) == (EXAMPLE, 0), tok.id
        hf = tok.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert hf == EXAMPLE, tok.id


def test_decode_with_prefix(registry):
    text = "Hello wörld, 你好 🦩!"
    for tok in registry:
        ids = tok.encode(text).ids
        for k in range(len(ids) + 1):
            before, pending_before = tok.decode(ids[:k])
            rest, pending = tok.decode(ids[k:], ids[:k])
            assert pending == 0, tok.id
            # before may hold back an incomplete character that rest then completes
            assert before + rest == text, (tok.id, k)
    with pytest.raises(TokenizerError, match="out of range"):
        registry.get("smollm2").decode([10**7])
    with pytest.raises(TokenizerError, match="out of range"):
        registry.get("gemma3").decode([5], prefix_ids=[-1])


@pytest.mark.parametrize("tid,text", [("gemma3", "🦩"), ("gemma3", "a𝔘b"), ("smollm2", "你好世界"), ("spm_bpe", "x🦩y"),
                                      ("spm_unigram", "x🦩y"), ("llama3_bpe", "ü🎉")])  # fmt: skip
def test_split_utf8_tokens_never_give_replacement_char(registry, tid, text):
    """Byte-fallback / partial-UTF-8 tokens are held back as pending bytes, then completed."""
    tok = registry.get(tid)
    ids = tok.encode(text, continuation=True).ids
    partial = [i for i in ids if not split_complete_utf8(tok.token_bytes(i))[0] and tok.token_bytes(i)]
    assert partial, f"{tid}: expected a token holding part of a character in {text!r}"
    out, held = "", 0
    for k, i in enumerate(ids):
        piece, pending = tok.decode([i], ids[:k])
        assert "\ufffd" not in piece, (tid, k)
        assert not (piece and held and pending == held + len(tok.token_bytes(i)))
        out, held = out + piece, pending
    assert out == text and held == 0
    # A lone byte-fallback token: nothing but pending bytes, no U+FFFD.
    lone = partial[0]
    assert tok.decode([lone]) == ("", len(tok.token_bytes(lone)))


def test_smollm2_unrepresentable_characters(registry):
    """Known gap of the bundled SmolLM2 vocabulary (not of coolfusion): bytes without a token are
    silently dropped by its BPE, so these characters cannot round-trip through it."""
    tok = registry.get("smollm2")
    for ch in [*SMOLLM2_MISSING, "\U00040000", "\U000a1234"]:
        assert tok.decode(tok.encode(f"a{ch}b").ids)[0] != f"a{ch}b"
    for ch in ["\x05", "\U0003fffd", "\U00010000", "\U000e0001", "\U000c0000", "\U0010fffd"]:
        assert tok.decode(tok.encode(f"a{ch}b").ids) == (f"a{ch}b", 0), repr(ch)


def test_sentencepiece_space_marker(registry):
    """Known gap of SentencePiece-style tokenizers: a literal `▁` in the text decodes as a space
    (the HF decoder does the same), so it cannot round-trip; ByteLevel tokenizers keep it."""
    for tid in ["gemma3", "spm_bpe", "spm_unigram"]:
        tok = registry.get(tid)
        ids = tok.encode("a\u2581b", continuation=True).ids
        assert tok.decode(ids) == ("a b", 0)
        assert tok.hf.decode(ids, skip_special_tokens=True) == "a b"
    for tid in ["smollm2", "llama3_bpe"]:
        tok = registry.get(tid)
        assert tok.decode(tok.encode("a\u2581b").ids) == ("a\u2581b", 0)


def test_split_complete_utf8():
    data = "a你".encode()
    assert split_complete_utf8(data) == ("a你", 0)
    assert split_complete_utf8(data[:-1]) == ("a", 2)
    assert split_complete_utf8(data[:-2]) == ("a", 1)
    assert split_complete_utf8("🦩".encode()[:3]) == ("", 3)
    assert split_complete_utf8(b"\xff") == ("\ufffd", 0)  # invalid, not incomplete
    assert split_complete_utf8(b"") == ("", 0)


def test_incremental_decoder(registry):
    context = "Prompt:"
    for text in [EXAMPLE, " 🦩𝔘 x\ufffd\t\n", "abc"]:
        for tok in registry:
            ctx_ids = tok.encode(context).ids
            ids = tok.encode(text, continuation=True).ids
            dec = IncrementalDecoder(tok)
            pieces = [dec.push(i) for i in ids]
            assert "".join(pieces) == dec.text == text, tok.id
            assert dec.text == tok.decode(ids, ctx_ids)[0]
            if tok.id not in DUMMY_PREFIX:
                assert dec.text == tok.decode(ids)[0]
            assert dec.pending == 0 and dec.ids == ids
            for k in range(len(ids)):
                part, pending = tok.decode(ids[: k + 1], ctx_ids)
                assert dec.token_ends[k] == (-1 if pending else len(part)), (tok.id, k)


# --------------------------------------------------------------------------------------------
# Property tests: segments, word starts in the full text, continuation encodings
# --------------------------------------------------------------------------------------------

PIECES = [
    "Multi", "-tasking", " isn't", "'s", " 1850", "2024", "3.14", " ", "  ", "\t", "\n", "\n\n", " \n", "\r\n",
    "héllo", "e\u0301", "ñ", "你好", "世界", "。", "😀", "👍🏽", "🦩", "\ufffd", "<div>", "</", "> </", ">", ",",
    "!", "?", "(", ")", "\"", "'", "-", "...", "a", "Z", "x1", "OK", " the", " The",
]  # fmt: skip
# SmolLM2's GGUF vocabulary lacks the byte-level tokens of bytes 0x04 0x06 0x13 0x14 0x16 0x1D and
# of the UTF-8 lead bytes 0xF1 0xF2: those characters (and all of U+40000-U+BFFFF) are dropped by
# its encoder (see test_smollm2_unrepresentable_characters), so random text avoids them. A literal
# U+2581 `▁` is the SentencePiece space marker: the SentencePiece-style tokenizers decode it as a
# space (test_sentencepiece_space_marker), so random text avoids it too.
SMOLLM2_MISSING = "\x04\x06\x13\x14\x16\x1d"
UNREPRESENTABLE = SMOLLM2_MISSING + "\u2581"
CHARS = st.one_of(
    st.sampled_from(list("aZé ü\t\n-',.!?0123456789你世😀\ufffd <>/") + ["e\u0301"]),
    st.characters(codec="utf-8", max_codepoint=0x3FFFF, exclude_categories=("Cs",), exclude_characters=UNREPRESENTABLE),
)
TEXT = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=14).map("".join),
    st.lists(CHARS, max_size=30).map("".join),
    st.lists(st.one_of(st.sampled_from(PIECES), CHARS), max_size=16).map("".join),
)
# The context never starts with white space: a Llama-2 style dummy prefix makes a leading space
# ambiguous (SentencePiece does not prepend `▁` to text that already starts with one, and the
# decoder strips it), a property of those tokenizers rather than of segmenting.
CONTEXT = st.one_of(st.just("Q:"), st.tuples(st.sampled_from("AbZ1你<.#"), TEXT).map("".join))

TOKENIZER_SETS = [
    ["smollm2", "gemma3"],
    ["smollm2"],
    ["gemma3"],
    ["llama3_bpe"],
    ["spm_bpe"],
    ["spm_unigram"],
    ["llama3_bpe", "spm_bpe"],
    ["llama3_bpe", "spm_unigram", "gemma3"],
    ALL_IDS,
]

# More examples for a deeper search: COOLFUSION_HYPOTHESIS_EXAMPLES=2000 pytest tests/test_tokenizer_core.py
MAX_EXAMPLES = int(os.environ.get("COOLFUSION_HYPOTHESIS_EXAMPLES", "150"))
PROPERTY_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def streamed_segments(registry, ids, context, text):
    """Cut ``text`` the way a worker does: the text grows one character at a time, and the first
    common boundary seen is committed. Each boundary must equal the one-shot boundary on the whole
    remaining text (it "cannot move" once the next word has begun)."""
    out = []
    while text:
        b = None
        for k in range(2, len(text) + 1):
            b = registry.common_boundary(context, text[:k], ids)
            if b is not None:
                break
        assert b == registry.common_boundary(context, text, ids), (context, text, b)
        if b is None:
            out.append(text)
            break
        out.append(text[:b])
        context, text = context + text[:b], text[b:]
    return out


def explain_difference(tok: TokenizerCore, full: str, cuts: list[int], context_cut: int) -> list[str]:
    r"""Why encoding piece by piece (context, then each segment with ``continuation=True``) may give
    other tokens than encoding ``full`` at once. Returns one reason per piece that differs, and
    fails the test for a piece whose difference is not one of these enumerated, accepted cases:

    1. ``mid-word context``: the cut between the test's random context and its text is not a word
       start for this tokenizer (the test cut mid-word; CommonBoundary never does), so the pieces
       on both sides of it may be tokenized differently.
    2. ``metaspace merge``: rule ``metaspace`` (Gemma-3, spm_bpe) does not pre-split, so BPE merges
       may cross SentencePiece word starts (Gemma's vocabulary token ``>▁</``, spm_bpe's ``g▁is``):
       a token of the full encoding spans the piece's edge.
    3. ``whitespace lookahead``: GPT-2/Llama-3 regex pre-tokenizers match a white-space run with
       ``\s+(?!\S)``: at the end of a text the run is one pre-token, but followed by a word its
       last character is split off (SmolLM2: ``"\n\n"`` alone is ``ĊĊ``, before ``OK`` it is
       ``Ċ``,``Ċ``). Only word starts inside the piece's trailing white space may differ.
    Every piece still decodes to exactly its own text, which the caller checks.
    """
    enc = tok.encode(full)
    full_starts = tok.word_starts(full)
    mid_word_context = context_cut not in full_starts
    reasons = []
    bounds = list(zip([0, *cuts], [*cuts, len(full)]))
    for n, (a, b) in enumerate(bounds):
        own = tok.encode(full[a:b], continuation=n > 0).ids
        inside = [i for i, (s, e) in zip(enc.ids, enc.spans) if a <= s and e <= b and (s < e or n == 0)]
        if own == inside:
            continue
        where = f"{tok.id}: piece {n} {full[a:b]!r}"
        if mid_word_context and context_cut in (a, b):
            reasons.append(f"{where}: mid-word context")
            continue
        if tok.boundary_rule == "metaspace" and any(s < c < e for s, e in enc.spans for c in (a, b)):
            reasons.append(f"{where}: metaspace merge")
            continue
        mine = {a + s for s in tok.word_starts(full[a:b])}
        theirs = {s for s in full_starts if a <= s < b}
        trailing_ws = a + len(full[a:b].rstrip())
        if tok.boundary_rule == "pretokenizer" and mine != theirs and min(mine ^ theirs) >= trailing_ws:
            reasons.append(f"{where}: whitespace lookahead")
            continue
        pytest.fail(f"{where}: tokens {own} differ from the full encoding's {inside} of {full!r}, no accepted reason")
    return reasons


@pytest.mark.parametrize("ids", TOKENIZER_SETS, ids=["+".join(s) for s in TOKENIZER_SETS])
@PROPERTY_SETTINGS
@given(context=CONTEXT, text=TEXT)
def test_segment_properties(registry, ids, context, text):
    segs = streamed_segments(registry, ids, context, text)
    # (a) the segments concatenate back to exactly the input
    assert "".join(segs) == text
    assert all(segs)
    full = context + text
    ends, pos = [], len(context)
    for seg in segs[:-1]:
        pos += len(seg)
        ends.append(pos)
    # (b) every segment end is a word start for every tokenizer in the full text
    for tid in ids:
        starts = set(registry.get(tid).word_starts(full))
        missing = [e for e in ends if e not in starts]
        assert not missing, f"{tid}: segment ends {missing} are not word starts of {full!r}"
    # (c) each tokenizer: context + continuation segments decode to exactly the full text
    for tid in ids:
        tok = registry.get(tid)
        seq = list(tok.encode(context).ids)
        for seg in segs:
            seq += tok.encode(seg, continuation=True).ids
        assert tok.decode(seq) == (full, 0), tid
        if seq != tok.encode(full).ids:
            reasons = explain_difference(tok, full, [len(context), *ends], len(context))
            assert reasons, f"{tid}: token sequences differ for {full!r} but no piece differs"
            for reason in reasons:
                event(f"{tid}: {reason.rsplit(': ', 1)[1]}")  # shown by --hypothesis-show-statistics


@PROPERTY_SETTINGS
@given(text=TEXT)
def test_word_starts_are_sorted_code_point_offsets(registry, text):
    for tok in registry:
        starts = tok.word_starts(text)
        assert starts == sorted(set(starts))
        if text:
            assert starts[0] == 0 and starts[-1] < len(text)
        else:
            assert starts == []


@PROPERTY_SETTINGS
@given(context=CONTEXT, text=TEXT)
def test_incremental_decoder_property(registry, context, text):
    for tok in registry:
        ctx_ids = tok.encode(context).ids
        ids = tok.encode(text, continuation=True).ids
        dec = IncrementalDecoder(tok)
        out = "".join(dec.push(i) for i in ids)
        assert out == dec.text == text == tok.decode(ids, ctx_ids)[0], tok.id
        assert dec.pending == 0
        assert [e for e in dec.token_ends if e >= 0] == sorted(e for e in dec.token_ends if e >= 0)
        if ids:
            assert dec.token_ends[-1] == len(text)
