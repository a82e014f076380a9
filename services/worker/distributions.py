"""The Distributions RPC's core: for every token of a worker's own tokenization of each text, the
distribution that predicted it (FuseLLM's "externalize" step of knowledge distillation).

Per token t of a text (``results.TextDistributions``): its id, its UTF-8 byte span in the text,
its gold log-prob log p(token_t | text before t), and the ``top_k`` most likely ids with their
log-probs normalized over the whole vocabulary (so the kept mass is known).

* **Tokenization**: the tokenizer's own encoding of the whole text without special tokens
  (``add_special_tokens=False``), read after a start token that is context, not a token of the
  text: the tokenizer's BOS when it adds one (Gemma-3), else the token the model separates
  documents with, ``<|endoftext|>`` when the vocabulary has it (GPT-2 family: SmolLM2), else its
  EOS. So the first token of a text has a row like every other.
* **Byte spans**: the tokens' exact bytes laid end to end when they spell the text (byte-level
  and byte-fallback tokens that split a character get their own bytes); otherwise the
  tokenizer's character offsets converted to bytes.
* **Windows**: a text longer than the model's context is split into consecutive windows of
  ``window`` tokens (the context less the start token; on llama.cpp at most a quarter of the
  worker's KV cells, which its sessions share; under a KV budget at most what the budget holds),
  each read after the start token alone. Never cut: every token gets a row, and
  ``window_starts`` says where each window starts.
* **Chunks**: a window is fed in chunks of positions (at most ``LOGITS_CHUNK_BYTES`` of float32
  logits, and at most the backend's prefill chunk) on a fresh KV cache (llama.cpp: a fresh
  sequence, released after the window). Each chunk is one forward under the worker's compute lock,
  so live sessions' steps run between chunks; log_softmax, gold and top-k are taken per chunk and
  only the top-k rows are kept. No full-vocabulary logits exist beyond one chunk.
* **Batch work**: at most ``MAX_RUNNING`` texts are computed at once per worker (more wait their
  turn); ``cancelled()`` (the caller left: cancel or deadline) is asked between chunks.

Limits (INVALID_ARGUMENT, checked before any forward): ``top_k`` in 1 .. vocab size; at most
``MAX_TEXTS`` texts and ``MAX_REQUEST_BYTES`` bytes of text per request; a text whose reply
message would pass ``MAX_REPLY_BYTES`` (tokens x top_k). Under a KV budget, a window that the
sessions leave no room for: RESOURCE_EXHAUSTED (retry later).

Clients (``client.py``):

* ``distributions(target, texts, top_k)``: an async generator over a worker address (or a
  ``grpc.aio`` channel)::

      from coolfusion.services.worker.client import distributions
      async for d in distributions("127.0.0.1:50061", texts, top_k=10):
          d.text_index, d.token_ids, d.topk_ids, ...   # a TextDistributions, in request order

* ``distributions_blocking(target, texts, top_k)``: the same as a plain iterator (sync channel);
* in-process: ``WorkerCore.distributions(texts, top_k)`` returns the same iterator.

A string target sends the internal token (``token=``, default ``$COOLFUSION_INTERNAL_TOKEN``'s).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc

from ..common.errors import CoolFusionError, InvalidArgument
from ..tokenizer.alignment import text_tokens
from . import logits as ops
from .results import TextDistributions

MAX_TEXTS = 1024
MAX_REQUEST_BYTES = 16 * 2**20
# One text's reply message at most (the channels carry 64 MiB): about 9 bytes per top-k entry.
MAX_REPLY_BYTES = 48 * 2**20
LOGITS_CHUNK_BYTES = 64 * 2**20
MAX_RUNNING = 2
LLAMACPP_CELL_SHARE = 4  # a window holds at most this fraction of a llama.cpp worker's KV cells

Cancelled = Callable[[], bool]


class DistributionsCancelled(CoolFusionError):
    """The caller left while its distributions were computed (CANCELLED)."""

    code = grpc.StatusCode.CANCELLED


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]
    starts: list[int]
    ends: list[int]
    n_bytes: int


def start_ids(tokenizer) -> list[int]:
    """The context a text is read after (module docstring; ``TokenizerCore.text_start_id``)."""
    if tokenizer.text_start_id is not None:
        return [tokenizer.text_start_id]
    raise InvalidArgument(f"tokenizer {tokenizer.id!r} has no BOS, document separator or EOS to start a text with")


def tokenize(tokenizer, text: str) -> Tokenized:
    """The text's tokens after the start token, with UTF-8 byte spans (the tokenizer service's
    alignment reads spans the same way: ``alignment.text_tokens``)."""
    ids, spans = text_tokens(tokenizer, text)
    return Tokenized(ids, [s for s, _ in spans], [e for _, e in spans], len(text.encode()))


def window_starts(n_tokens: int, window: int) -> list[int]:
    return list(range(0, n_tokens, max(1, window)))


class Distributions:
    """Distributions of one worker's model. ``window``: tokens per context window (None: the
    model's context, and at most ``max_window()`` tokens in all when that is not 0: the worker's
    share of KV cells or budget). ``room(tokens)``: raises when a window of that many tokens may
    not be held now (the worker's KV budget)."""

    def __init__(
        self,
        loaded,
        forwards,
        room: Callable[[int], None] = lambda tokens: None,
        max_window: Callable[[], int] = lambda: 0,
    ):
        self.loaded = loaded
        self.forwards = forwards
        self.room = room
        self.max_window = max_window
        self.window: int | None = None
        self.start = start_ids(loaded.tokenizer)
        self._running = threading.BoundedSemaphore(MAX_RUNNING)

    @property
    def chunk(self) -> int:
        """Positions per forward: the logits of one chunk stay within ``LOGITS_CHUNK_BYTES``."""
        return max(1, min(self.forwards.prefill_chunk, LOGITS_CHUNK_BYTES // (4 * self.loaded.vocab_size)))

    def text_window(self) -> int:
        """Tokens of a text per context window."""
        if self.window:
            return max(1, int(self.window))
        limits = [m for m in (self.loaded.max_positions, self.max_window()) if m]
        return max(1, min(limits) - 1 - len(self.start)) if limits else 1 << 30

    def check(self, texts: Sequence[str], top_k: int) -> list[Tokenized]:
        """Every text tokenized, or InvalidArgument for a request over a limit (module docstring)."""
        vocab = self.loaded.vocab_size
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
            raise InvalidArgument(f"top_k must be in 1..{vocab} (the vocabulary of {self.loaded.name}), got {top_k!r}")
        if len(texts) > MAX_TEXTS:
            raise InvalidArgument(f"{len(texts)} texts in one request; at most {MAX_TEXTS}")
        if any(not isinstance(t, str) for t in texts):
            raise InvalidArgument("texts must be strings")
        size = sum(len(t.encode()) for t in texts)
        if size > MAX_REQUEST_BYTES:
            raise InvalidArgument(f"{size} bytes of text in one request; at most {MAX_REQUEST_BYTES}")
        tokenized = [tokenize(self.loaded.tokenizer, t) for t in texts]
        for i, tok in enumerate(tokenized):
            reply = len(tok.ids) * (9 * top_k + 16)
            if reply > MAX_REPLY_BYTES:
                raise InvalidArgument(
                    f"text {i}: {len(tok.ids)} tokens x top_k {top_k} make a reply of about {reply / 2**20:.1f} MiB; "
                    f"at most {MAX_REPLY_BYTES / 2**20:.1f} MiB: lower top_k or split the text"
                )
        return tokenized

    def run(self, texts: Sequence[str], top_k: int, cancelled: Cancelled | None = None) -> Iterator[TextDistributions]:
        """Check the request now, then yield each text's distributions in order."""
        tokenized = self.check(texts, top_k)
        return self._each(tokenized, top_k, cancelled or (lambda: False))

    def _each(self, tokenized: list[Tokenized], k: int, cancelled: Cancelled) -> Iterator[TextDistributions]:
        window = self.text_window()
        for index, tok in enumerate(tokenized):
            starts = window_starts(len(tok.ids), window)
            gold: list[float] = []
            top_ids: list[list[int]] = []
            top_lps: list[list[float]] = []
            self._wait_turn(cancelled)
            try:
                for s in starts:
                    ids = tok.ids[s : s + window]
                    self.room(len(self.start) + len(ids))
                    rows = self._window_rows(self.start + ids, k, cancelled)
                    gold += rows[0]
                    top_ids += rows[1]
                    top_lps += rows[2]
            finally:
                self._running.release()
            yield TextDistributions(index, tok.ids, tok.starts, tok.ends, gold, top_ids, top_lps, tok.n_bytes, starts)

    def _wait_turn(self, cancelled: Cancelled) -> None:
        while not self._running.acquire(timeout=0.05):
            if cancelled():
                raise DistributionsCancelled("distributions cancelled while waiting for their turn")

    def _window_rows(self, context: list[int], k: int, cancelled: Cancelled):
        """(gold log-probs, top-k ids, top-k log-probs) of every token of ``context`` after the
        start token: positions fed chunk by chunk on a fresh cache (its last token needs no feed)."""
        first = len(self.start) - 1  # the position whose logits predict the text's first token
        feed = context[:-1]
        gold, top_ids, top_lps = [], [], []
        cache = self.forwards.new_cache()
        step = self.chunk
        try:
            with self.forwards.inference():
                for a in range(0, len(feed), step):
                    if a and cancelled():
                        raise DistributionsCancelled(f"distributions cancelled after {a} of {len(feed)} positions")
                    logits = self.forwards.forward([feed[a : a + step]], cache, keep_last=False)[0]
                    lo = max(first - a, 0)
                    if lo >= logits.shape[0]:
                        continue
                    logp = ops.log_softmax(ops.float32(logits[lo:]))
                    del logits
                    gold += ops.gather(logp, context[a + lo + 1 : a + step + 1])
                    values, indices = ops.top_k(logp, k)
                    top_ids += indices
                    top_lps += values
                    del logp
        finally:
            del cache  # llama.cpp: its sequence goes back to the context
        return gold, top_ids, top_lps
