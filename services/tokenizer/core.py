"""Tokenizer core (paper T2/T3): encoding, context-correct decoding, word starts and the word
boundary common to several tokenizers. Plain Python over transformers/`tokenizers`; the gRPC
servicer in ``server.py`` is a thin wrapper, and workers use this module in-process too.

Offsets are Unicode code points of Python ``str``.

Word-start rules (``boundary_rule``):

* ``pretokenizer`` - the tokenizer's own pre-tokenizer splits text into words (ByteLevel regex
  of GPT-2/SmolLM2/Llama-3, Metaspace of Llama-2/T5 ...): a word starts where a pre-token starts.
  When a normalizer is present the words come from ``encode(...).word_ids`` instead, whose offsets
  are aligned to the original text.
* ``metaspace`` - the tokenizer never splits before BPE (Gemma-3 from GGUF: spaces become ``▁``
  and the split pattern then never matches), so words follow the SentencePiece convention: a word
  starts at offset 0 and at the first space of every run of spaces (the token that begins with
  ``▁``). Newlines: a run of newlines is a word of its own (it starts one, and so does the
  character after it). Gemma's vocabulary has no token that mixes newlines with other
  characters, so these offsets are always token boundaries; tabs and other white space stay
  inside words.

A boundary common to several tokenizers (``TokenizerRegistry.common_boundary``) is returned only
once a character that is not white space follows it: regex pre-tokenizers split a trailing run of
white space differently when more text arrives, and the boundary must not move.

Decoding drops a Llama-2 style dummy-prefix space at the very start of ``prefix_ids + ids``, as
the HF decoder does (``Metaspace`` decoder with a prepend scheme, or ``Strip(" ", start=1)``).
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import groupby

from tokenizers import Tokenizer

from ..common.errors import InvalidArgument, NotFound


class TokenizerError(InvalidArgument):
    """Bad input for a tokenizer call (INVALID_ARGUMENT)."""


class UnknownTokenizerError(NotFound):
    """No tokenizer with that id (NOT_FOUND)."""


@dataclass
class Encoded:
    ids: list[int]
    tokens: list[str]
    spans: list[tuple[int, int]]


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable char each byte is mapped to."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _component_spec(component) -> dict | None:
    """A tokenizer component (normalizer, pre-tokenizer, decoder) as its JSON object."""
    return None if component is None else json.loads(component.__getstate__())


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def split_complete_utf8(data: bytes) -> tuple[str, int]:
    """Decode ``data`` up to its last complete UTF-8 character.

    Returns (text, pending) where ``pending`` trailing bytes start an incomplete character and
    are held back rather than turned into U+FFFD. Invalid bytes elsewhere become U+FFFD.
    """
    cut = len(data)
    # An incomplete character is at most 3 bytes: a lead byte followed by fewer continuation bytes than it needs.
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead
            continue
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        if need > back:
            cut = len(data) - back
        break
    return data[:cut].decode("utf-8", errors="replace"), len(data) - cut


DOCUMENT_SEPARATOR = "<|endoftext|>"


def text_start_id(adds_bos: bool, bos_token_id: int | None, eos_token_id: int | None, separator_id: int | None):
    """The token a corpus text is read after, as context and not a token of the text: the BOS
    when the tokenizer adds one (Gemma-3), else the document separator ``<|endoftext|>`` when the
    vocabulary has it (``separator_id``; GPT-2 family: SmolLM2, whose pretraining put it between
    documents), else the EOS; None when there is none of them. Knowledge distillation externalizes
    the sources' distributions after it and trains the target after it, so the two agree."""
    if adds_bos:
        return bos_token_id
    return separator_id if separator_id is not None else eos_token_id


class TokenizerCore:
    """One loaded tokenizer with the operations coolfusion needs."""

    def __init__(self, tokenizer_id: str, hf_tokenizer, source: str = ""):
        self.id = tokenizer_id
        self.hf = hf_tokenizer
        self.source = source
        self.backend: Tokenizer = hf_tokenizer.backend_tokenizer
        # Components one by one: the whole tokenizer as JSON is megabytes (Gemma-3: 262k tokens).
        normalizer, pre_tokenizer, decoder = (
            _component_spec(getattr(self.backend, part)) for part in ("normalizer", "pre_tokenizer", "decoder")
        )
        added = self.backend.get_added_tokens_decoder()
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.bos_token_id = hf_tokenizer.bos_token, hf_tokenizer.bos_token_id
        self.eos_token, self.eos_token_id = hf_tokenizer.eos_token, hf_tokenizer.eos_token_id
        probe = self.backend.encode("a", add_special_tokens=True).ids
        self.adds_bos = self.bos_token_id is not None and bool(probe) and probe[0] == self.bos_token_id
        self.has_chat_template = bool(getattr(hf_tokenizer, "chat_template", None))
        self.text_start_id = text_start_id(
            self.adds_bos, self.bos_token_id, self.eos_token_id, self.backend.token_to_id(DOCUMENT_SEPARATOR)
        )
        self.special_ids = frozenset(i for i, token in added.items() if token.special)
        self._continuation = self._continuation_backend(self.backend, normalizer, pre_tokenizer, added)
        self._token_bytes = self._build_token_bytes(decoder, added)
        self._strips_leading_space = self._decoder_strips_leading_space(decoder)
        self._pre_tokenizer = self.backend.pre_tokenizer
        self.boundary_rule = self._detect_rule()

    # ---- construction helpers -------------------------------------------------------------
    @staticmethod
    def _continuation_backend(backend: Tokenizer, normalizer, pre_tokenizer, added: dict) -> Tokenizer:
        """A copy that encodes text continuing an earlier text: no dummy-prefix space. It shares
        ``backend``'s model (vocabulary and merges) instead of rebuilding it."""

        def strip_prepend(node):
            if not isinstance(node, dict):
                return node
            if node.get("type") == "Prepend":
                return None
            if node.get("type") == "Metaspace":
                node["prepend_scheme"] = "never"
                node["add_prefix_space"] = False
            if node.get("type") == "Sequence":
                for key in ("normalizers", "pretokenizers", "pre_tokenizers"):
                    if key in node:
                        node[key] = [n for n in (strip_prepend(x) for x in node[key]) if n is not None]
            return node

        pre_tokenizer = strip_prepend(pre_tokenizer)
        if isinstance(pre_tokenizer, dict) and pre_tokenizer.get("type") == "ByteLevel":
            pre_tokenizer["add_prefix_space"] = False
        parts = Tokenizer.from_str(
            json.dumps(
                {
                    "version": "1.0",
                    "truncation": None,
                    "padding": None,
                    "added_tokens": [],
                    "normalizer": strip_prepend(normalizer),
                    "pre_tokenizer": pre_tokenizer,
                    "post_processor": None,
                    "decoder": None,
                    "model": {"type": "WordLevel", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"},
                }
            )
        )
        continuation = Tokenizer(backend.model)
        continuation.normalizer = parts.normalizer
        continuation.pre_tokenizer = parts.pre_tokenizer
        continuation.decoder = backend.decoder
        # In id order, so a token beyond the model's vocabulary gets the id it has in ``backend``.
        for special, run in groupby(sorted(added.items()), key=lambda item: item[1].special):
            tokens = [token for _, token in run]
            if special:
                continuation.add_special_tokens(tokens)
            else:
                continuation.add_tokens(tokens)
        return continuation

    def _build_token_bytes(self, decoder: dict | None, added: dict) -> list[bytes] | None:
        """Exact bytes each token contributes to the text, or None for decoders we do not model."""
        decoder = decoder or {}
        steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        kinds = {d.get("type") for d in steps if d}
        vocab = self.backend.get_vocab(with_added_tokens=True)
        table: list[bytes] = [b""] * (max(vocab.values()) + 1)
        if kinds <= {"ByteLevel"} and kinds:
            inverse = _byte_level_decoder()
            for token, idx in vocab.items():
                if idx in added:
                    table[idx] = b"" if added[idx].special else token.encode()
                else:
                    table[idx] = (
                        bytes(inverse[c] for c in token) if all(c in inverse for c in token) else token.encode()
                    )
            return table
        if kinds <= {"Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}:
            replaces = [
                (d["pattern"]["String"], d["content"])
                for d in steps
                if d.get("type") == "Replace" and "String" in d.get("pattern", {})
            ]
            if "Metaspace" in kinds:
                replaces.append(("▁", " "))
            for token, idx in vocab.items():
                if idx in added:
                    table[idx] = b"" if added[idx].special else token.encode()
                    continue
                match = _BYTE_FALLBACK.match(token) if "ByteFallback" in kinds else None
                if match:
                    table[idx] = bytes([int(match.group(1), 16)])
                    continue
                for old, new in replaces:
                    token = token.replace(old, new)
                table[idx] = token.encode()
            return table
        return None

    @staticmethod
    def _decoder_strips_leading_space(decoder: dict | None) -> bool:
        """Whether the decoder removes the dummy-prefix space at the start of the text (Llama-2 style:
        a ``Metaspace`` decoder with prepend_scheme first/always, or ``Strip(" ", start=1)``)."""
        decoder = decoder or {}
        steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
        for d in steps:
            if not d:
                continue
            if d.get("type") == "Metaspace":
                scheme = d.get("prepend_scheme", "always" if d.get("add_prefix_space", True) else "never")
                if scheme != "never":
                    return True
            if d.get("type") == "Strip" and d.get("content") == " " and d.get("start", 0) > 0:
                return True
        return False

    def _detect_rule(self) -> str:
        """``pretokenizer`` when the normalized text is split into several words, else ``metaspace``."""
        probe = "ab cd ef"
        if self.backend.normalizer is not None:
            probe = self.backend.normalizer.normalize_str(probe)
        if self._pre_tokenizer is not None and len(self._pre_tokenizer.pre_tokenize_str(probe)) > 1:
            return "pretokenizer"
        return "metaspace"

    # ---- T2: encode ----------------------------------------------------------------------
    def encode(self, text: str, continuation: bool = False) -> Encoded:
        if continuation:
            enc = self._continuation.encode(text, add_special_tokens=False)
        else:
            enc = self.backend.encode(text, add_special_tokens=True)
        return Encoded(list(enc.ids), list(enc.tokens), [tuple(o) for o in enc.offsets])

    def encode_ids(self, text: str, continuation: bool = True) -> list[int]:
        backend = self._continuation if continuation else self.backend
        return list(backend.encode(text, add_special_tokens=not continuation).ids)

    # ---- T3: decode ----------------------------------------------------------------------
    def check_ids(self, ids: Iterable[int]) -> None:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(
                    f"token id {i} out of range for tokenizer {self.id!r} (vocab size {self.vocab_size})"
                )

    def token_bytes(self, token_id: int, keep_special: bool = False) -> bytes:
        if self._token_bytes is None:
            raise NotImplementedError
        if keep_special and token_id in self.special_ids:
            return self.backend.id_to_token(token_id).encode()
        return self._token_bytes[token_id]

    @property
    def byte_exact(self) -> bool:
        """Whether tokens map to exact byte strings (incremental decoding without the HF decoder)."""
        return self._token_bytes is not None

    def decode_bytes(self, ids: Sequence[int], keep_special: bool = False) -> bytes:
        return b"".join(self.token_bytes(i, keep_special) for i in ids)

    def decode(self, ids: Sequence[int], prefix_ids: Sequence[int] = (), keep_special: bool = False) -> tuple[str, int]:
        """Text of ``ids`` in the context of ``prefix_ids``; returns (text, pending_bytes).

        As with the HF decoder, a dummy-prefix space at the very start of ``prefix_ids + ids``
        (Llama-2 style ``Metaspace``/``Strip`` decoders) is not part of the text. Tokens that
        continue a text therefore keep their leading space only when decoded after their context.
        """
        self.check_ids(ids)
        self.check_ids(prefix_ids)
        if self.byte_exact:
            prefix = self.decode_bytes(prefix_ids, keep_special)
            full = prefix + self.decode_bytes(ids, keep_special)
            if self._strips_leading_space and full.startswith(b" "):
                # The dummy-prefix space of the first token is not text (as in the HF decoder).
                prefix, full = prefix[1:], full[1:]
            before, _ = split_complete_utf8(prefix)
            after, pending = split_complete_utf8(full)
            return after[len(before) :], pending
        # Generic decoders: decode in context and strip the prefix's text.
        skip = not keep_special
        before = self.hf.decode(list(prefix_ids), skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        after = self.hf.decode(
            list(prefix_ids) + list(ids), skip_special_tokens=skip, clean_up_tokenization_spaces=False
        )
        pending = 0
        while after.endswith("\ufffd") and len(after) > len(before):
            after, pending = after[:-1], pending + 1
        return after[len(before) :], pending

    # ---- T2: words -----------------------------------------------------------------------
    def word_starts(self, text: str) -> list[int]:
        """Sorted offsets where words start (0 included for non-empty text)."""
        if not text:
            return []
        if self.boundary_rule == "metaspace":
            return _metaspace_word_starts(text)
        if self.backend.normalizer is None:
            starts = {start for _, (start, _end) in self._pre_tokenizer.pre_tokenize_str(text)}
        else:
            enc = self._continuation.encode(text, add_special_tokens=False)
            starts, seen = set(), set()
            for word, (start, _end) in zip(enc.word_ids, enc.offsets):
                if word is not None and word not in seen:
                    seen.add(word)
                    starts.add(start)
        starts.add(0)
        return sorted(starts)

    def info(self) -> dict:
        return {
            "id": self.id,
            "vocab_size": self.vocab_size,
            "bos_token": self.bos_token or "",
            "bos_token_id": -1 if self.bos_token_id is None else self.bos_token_id,
            "eos_token": self.eos_token or "",
            "eos_token_id": -1 if self.eos_token_id is None else self.eos_token_id,
            "adds_bos": self.adds_bos,
            "boundary_rule": self.boundary_rule,
            "source": self.source,
            "has_chat_template": self.has_chat_template,
        }


def _metaspace_word_starts(text: str) -> list[int]:
    starts = [0]
    prev = ""
    for i, ch in enumerate(text):
        if i and ((ch == " " and prev != " ") or (ch == "\n" and prev != "\n") or (prev == "\n" and ch != "\n")):
            starts.append(i)
        prev = ch
    return starts


class IncrementalDecoder:
    """Token-by-token text of a generation: complete characters only, U+FFFD never invented."""

    def __init__(self, tokenizer: TokenizerCore):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._bytes = bytearray()
        self.text = ""
        self.pending = 0
        self.token_ends: list[int] = []  # character offset where each token's complete text ends

    def push(self, token_id: int) -> str:
        """Add a token; returns the newly completed text."""
        self.ids.append(token_id)
        if self.tokenizer.byte_exact:
            new = self.tokenizer.token_bytes(token_id)
            # Only the held-back bytes and the new token can change: decode just those.
            piece, self.pending = split_complete_utf8(bytes(self._bytes[len(self._bytes) - self.pending :]) + new)
            self._bytes += new
        else:
            text, self.pending = self.tokenizer.decode(self.ids)
            piece = text[len(self.text) :]
        self.text += piece
        self.token_ends.append(len(self.text) if self.pending == 0 else -1)
        return piece


class TokenizerRegistry:
    """Every configured tokenizer, by id; computes boundaries common to several of them."""

    def __init__(self, tokenizers: Iterable[TokenizerCore] = ()):
        self._by_id: dict[str, TokenizerCore] = {}
        for tok in tokenizers:
            self.add(tok)

    def add(self, tokenizer: TokenizerCore) -> None:
        self._by_id[tokenizer.id] = tokenizer

    @property
    def ids(self) -> list[str]:
        return list(self._by_id)

    def __iter__(self):
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, tokenizer_id: str) -> TokenizerCore:
        try:
            return self._by_id[tokenizer_id]
        except KeyError:
            raise UnknownTokenizerError(
                f"unknown tokenizer {tokenizer_id!r}; loaded: {', '.join(self._by_id) or 'none'}"
            ) from None

    def common_boundary(
        self,
        context_tail: str,
        generated_text: str,
        tokenizer_ids: Sequence[str],
        allowed_offsets: Sequence[int] | None = None,
    ) -> int | None:
        r"""First offset b in ``generated_text`` (0 < b < len) that starts a word for every tokenizer.

        Word starts are computed on ``context_tail + generated_text`` so that the words right
        after the context are seen in context. The next word must have begun with a character
        that is not white space (some ``generated_text[i]``, i >= b, is not white space), so b
        cannot move as more text arrives: regex pre-tokenizers decide how a run of white space
        is split only once the run has ended (Llama-3's ``\s*[\r\n]+`` makes ``"\n "`` two
        words but ``"\n \n"`` one; GPT-2's ``\s+(?!\S)`` moves a run's last space to the next
        word). Each tokenizer's starts are computed once (linear in the text), so the search
        never loops on odd input such as a literal U+FFFD.
        """
        if not tokenizer_ids:
            raise TokenizerError("tokenizer_ids must name at least one tokenizer")
        tokenizers = [self.get(t) for t in tokenizer_ids]
        if len(generated_text) < 2:
            return None
        base = len(context_tail)
        full = context_tail + generated_text
        last = len(full) - 1  # the last character that is not white space bounds b
        while last > base and full[last].isspace():
            last -= 1
        if last <= base:
            return None
        common: set[int] | None = None
        for tok in tokenizers:
            starts = tok.word_starts(full)
            lo = bisect_left(starts, base + 1)
            mine = {s - base for s in starts[lo:] if s <= last}
            common = mine if common is None else common & mine
            if not common:
                return None
        if allowed_offsets is not None:
            common &= set(allowed_offsets)
        return min(common) if common else None
