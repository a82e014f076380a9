"""The llama.cpp backend: a worker's forwards on llama-cpp-python, straight from the GGUF file.

llama.cpp runs the quantised GGUF weights as they are (no dequantised fp32 copy), which on a
CPU is about three times as fast as the transformers path. Everything above the forwards
(sessions, NextText, scoring, commits, batching) is the same code for both backends: the worker
core talks to a backend through ``Forwards`` (``forward.py``) and a KV cache object with the part
of ``DynamicCache``'s API it uses (``get_seq_length``, ``crop``, ``batch_repeat_interleave``,
``batch_select_indices``, ``copy.deepcopy``). Here that object is ``SequenceKV``: llama.cpp
sequences of one context.

One context per worker holds every session. Its KV cells are *unified*: a sequence copy
(``seq_cp``) shares the cells instead of copying them, so forking a session's committed state
for scoring costs nothing, and the decode steps of several sessions go into one ``llama_decode``
(a sequence per row). Rolling back removes positions (``seq_rm``), never recomputes;
``swa_full`` keeps every state of sliding-window layers (Gemma-3) so that a rollback past the
window still finds the states it needs.

The tokenizer stays the converted Hugging Face one (same ids as the GGUF vocabulary): boundary
checks, encoding and decoding are the same on both backends.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np

from ..common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from ..sources import torch_available
from .batching import StepBatcher
from .forward import Forwards

log = logging.getLogger(__name__)

BACKENDS = ("transformers", "llamacpp")
# KV cells of a worker's context, shared by all its sessions and their scoring forks (a fork
# shares its parent's cells). Cells are small for the bundled models: ~21 KiB a token for SmolLM2.
DEFAULT_KV_CELLS = 16384
# Live sessions a llama.cpp worker keeps at most (fewer when --max-sessions says so): beyond, the
# least recently used idle one is evicted, so that scoring rows always find sequences.
MAX_SESSIONS = 48
# The prefix cache on this backend: contexts it keeps at most (each entry holds a sequence and
# its cells, at most a quarter of the cells in all), and the shortest it keeps.
PREFIX_ENTRIES = 8
PREFIX_MIN_TOKENS = 64
# Sequences of one context: live sessions, their scoring rows (a sequence per candidate) and the
# prefix cache's entries. The logits buffer holds a row per sequence (1 MiB each for Gemma-3).
MAX_SEQUENCES = MAX_SESSIONS + 16 + PREFIX_ENTRIES
DECODE_TOKENS = 512  # tokens per llama_decode call (n_batch = n_ubatch)

INSTALL_HINT = (
    "install it with `COOLFUSION_LLAMACPP=1 bash scripts/install.sh` (a ~10 minute build) or run with "
    "--backend transformers"
)


def llamacpp_available() -> bool:
    """llama-cpp-python can be imported (its build holds the native library)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # a broken build raises OSError or RuntimeError, not only ImportError
        return False
    return True


def _cuda_available() -> bool:
    if not torch_available():
        return False
    import torch

    return torch.cuda.is_available()


def resolve_backend(backend: str | None, spec, device: str | None) -> str:
    """The backend a worker runs: ``backend`` when given; else ("auto") transformers on CUDA,
    llama.cpp for a ``.gguf`` source on the CPU when llama-cpp-python is installed, else
    transformers. FailedPrecondition for a choice that cannot run here: llama.cpp without its
    build or a GGUF file, transformers without torch."""
    backend = (backend or "auto").lower()
    if backend not in BACKENDS + ("auto",):
        raise InvalidArgument(f"unknown backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    if backend == "auto":
        cuda = device == "cuda" or (device is None and _cuda_available())
        backend = "llamacpp" if spec.is_gguf and not cuda and llamacpp_available() else "transformers"
    elif backend == "llamacpp":
        if not spec.is_gguf:
            raise FailedPrecondition(
                f"model {spec.name!r}: the llama.cpp backend loads .gguf files, not {spec.source!r}; "
                "use --backend transformers"
            )
        if device not in (None, "cpu"):
            raise FailedPrecondition(f"model {spec.name!r}: this llama.cpp build runs on the CPU, not {device!r}")
        if not llamacpp_available():
            raise FailedPrecondition(f"model {spec.name!r}: --backend llamacpp needs llama-cpp-python; {INSTALL_HINT}")
    if backend == "transformers" and not torch_available():
        raise FailedPrecondition(
            f"model {spec.name!r}: the transformers backend needs torch, which is not installed in this image; "
            "use a GGUF model with --backend llamacpp, or the GPU image"
        )
    return backend


def _quiet_log(level, text, user_data) -> None:
    """llama.cpp's own log, errors only (it prints every tensor it loads otherwise)."""
    if level == 4:  # GGML_LOG_LEVEL_ERROR
        log.error("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


def end_of_generation_ids(vocab) -> tuple[int, ...]:
    """Every token of a llama.cpp vocabulary that ends a generation (EOS, end of turn, ...)."""
    import llama_cpp as ll

    return tuple(t for t in range(int(ll.llama_vocab_n_tokens(vocab))) if ll.llama_vocab_is_eog(vocab, t))


class LlamaCppModel:
    """A GGUF model and one llama.cpp context whose KV cells every session of the worker shares.

    Not thread-safe by itself: every call into the context holds ``lock`` (also the worker's
    compute lock, ``forward.compute_lock``)."""

    def __init__(self, path: str, name: str, threads: int, kv_cells: int = DEFAULT_KV_CELLS):
        import llama_cpp as ll

        self.ll = ll
        self.name = name
        self.lock = threading.RLock()
        self.__dict__["_coolfusion_compute_lock"] = self.lock
        ll.llama_backend_init()
        if not getattr(LlamaCppModel, "_log_set", False):
            LlamaCppModel._callback = ll.llama_log_callback(_quiet_log)  # kept alive: llama.cpp holds it
            ll.llama_log_set(LlamaCppModel._callback, ctypes.c_void_p(0))
            LlamaCppModel._log_set = True
        mparams = ll.llama_model_default_params()
        mparams.use_mmap = True
        model = ll.llama_model_load_from_file(path.encode(), mparams)
        if not model:
            raise FailedPrecondition(
                f"model {name!r}: llama.cpp could not load {path} (not a GGUF file, or an architecture this "
                "llama.cpp build does not know); use --backend transformers"
            )
        self._model = model
        self.vocab = ll.llama_model_get_vocab(model)
        self.vocab_size = int(ll.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(ll.llama_model_n_ctx_train(model))
        self.parameters = int(ll.llama_model_n_params(model))
        self.eog_ids = end_of_generation_ids(self.vocab)
        self.eos_id = int(ll.llama_vocab_eos(self.vocab))
        cparams = ll.llama_context_default_params()
        self.kv_cells = int(kv_cells)
        cparams.n_ctx = self.kv_cells
        cparams.n_batch = cparams.n_ubatch = DECODE_TOKENS
        cparams.n_seq_max = MAX_SEQUENCES
        cparams.n_threads = cparams.n_threads_batch = max(1, threads)
        cparams.kv_unified = True
        cparams.swa_full = True
        cparams.no_perf = True
        # This build's CPU flash attention gives logits that depend on how a sequence was split
        # into decode calls (up to a nat apart); without it they are bitwise the same.
        cparams.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = ll.llama_init_from_model(model, cparams)
        if not self._ctx:
            ll.llama_model_free(model)
            raise ResourceExhausted(f"model {name!r}: llama.cpp could not make a context of {kv_cells} KV cells")
        self.kv_cells = int(ll.llama_n_ctx(self._ctx))
        self._mem = ll.llama_get_memory(self._ctx)
        self._batch = ll.llama_batch_init(DECODE_TOKENS, 0, 1)
        self._free_seqs = list(range(MAX_SEQUENCES - 1, -1, -1))
        self._released: list[int] = []  # freed by garbage collection, removed at the next call
        # Called when the cells are full, to free some (the prefix cache's oldest entry); False
        # when it freed nothing.
        self.make_room: Callable[[], bool] | None = None
        self.threads = max(1, threads)
        self.kv_bytes_per_token = self._measure_kv_bytes()

    # ---- sequences -----------------------------------------------------------------------
    def new_seq(self) -> int:
        with self.lock:
            self._drain()
            if not self._free_seqs:
                raise ResourceExhausted(
                    f"worker {self.name!r}: all {MAX_SEQUENCES} llama.cpp sequences are in use "
                    "(sessions and their scoring rows); retry later"
                )
            return self._free_seqs.pop()

    def release(self, seq: int) -> None:
        """Called from ``SequenceKV.__del__`` (any thread, maybe inside another call): only queued."""
        self._released.append(seq)

    def _drain(self) -> None:
        while self._released:
            seq = self._released.pop()
            self.ll.llama_memory_seq_rm(self._mem, seq, -1, -1)
            self._free_seqs.append(seq)

    def copy_seq(self, src: int, length: int) -> int:
        """A new sequence sharing the first ``length`` cells of ``src`` (no copy: unified cells)."""
        with self.lock:
            dst = self.new_seq()
            self.ll.llama_memory_seq_cp(self._mem, src, dst, 0, length)
            return dst

    def remove_from(self, seq: int, position: int) -> None:
        with self.lock:
            if not self.ll.llama_memory_seq_rm(self._mem, seq, position, -1):
                raise RuntimeError(f"llama.cpp could not remove positions {position}.. of sequence {seq}")

    # ---- decoding ------------------------------------------------------------------------
    def decode(self, entries: list[tuple[int, int, list[int], int]]) -> list[np.ndarray]:
        """Forward each ``(seq, start position, tokens, logits_from)`` in as few ``llama_decode``
        calls as fit; returns each entry's float32 logits after its tokens from ``logits_from`` on
        (numpy arrays: the worker's logit arithmetic takes them as they are, ``logits.py``)."""
        flat = [
            (seq, pos + i, token, i >= first) for seq, pos, tokens, first in entries for i, token in enumerate(tokens)
        ]
        outputs: list[np.ndarray] = []
        ll, batch = self.ll, self._batch
        with self.lock:
            self._drain()
            ll.llama_set_n_threads(self._ctx, self.threads, self.threads)
            for start in range(0, len(flat), DECODE_TOKENS):
                chunk = flat[start : start + DECODE_TOKENS]
                batch.n_tokens = len(chunk)
                for i, (seq, pos, token, want) in enumerate(chunk):
                    batch.token[i] = token
                    batch.pos[i] = pos
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = want
                status = ll.llama_decode(self._ctx, batch)
                while status == 1 and self.make_room is not None and self.make_room():
                    self._drain()  # a failed decode stored nothing: the same batch again
                    status = ll.llama_decode(self._ctx, batch)
                if status == 1:
                    raise ResourceExhausted(
                        f"worker {self.name!r}: the {self.kv_cells} llama.cpp KV cells are full "
                        "(raise --kv-cells, or retry when sessions closed)"
                    )
                if status != 0:
                    raise RuntimeError(f"llama_decode failed with status {status}")
                wanted = sum(1 for c in chunk if c[3])
                if wanted:
                    ptr = ll.llama_get_logits(self._ctx)
                    outputs.append(np.ctypeslib.as_array(ptr, shape=(wanted, self.vocab_size)).copy())
        if not outputs:
            rows = np.empty((0, self.vocab_size), np.float32)
        else:  # one decode call in the usual case: its copy is the result, not copied again
            rows = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        out, at = [], 0
        for _seq, _pos, tokens, first in entries:
            n = max(0, len(tokens) - first)
            out.append(rows[at : at + n])
            at += n
        return out

    def _measure_kv_bytes(self) -> int:
        """KV bytes a token holds: a sequence's state size with two tokens less that with one."""
        seq = self.new_seq()
        sizes = []
        for n in (1, 2):
            self.decode([(seq, n - 1, [self.eos_id if self.eos_id >= 0 else 0], 0)])
            sizes.append(int(self.ll.llama_state_seq_get_size(self._ctx, seq)))
        self.remove_from(seq, 0)
        self._free_seqs.append(seq)
        return max(1, sizes[1] - sizes[0])

    def close(self) -> None:
        with self.lock:
            if self._ctx:
                self.ll.llama_batch_free(self._batch)
                self.ll.llama_free(self._ctx)
                self.ll.llama_model_free(self._model)
                self._ctx = self._model = None

    def __del__(self):  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass


class SequenceKV:
    """The KV cache of one or more rows of equal length, each a llama.cpp sequence: the object
    a session (or a scoring batch) holds where the transformers backend holds a ``DynamicCache``.
    Its sequences go back to the context when it is garbage collected."""

    def __init__(self, model: LlamaCppModel, seqs: list[int] | None = None, length: int = 0):
        self.model = model
        self.seqs = [model.new_seq()] if seqs is None else seqs
        self.length = length

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """``DynamicCache.crop``: keep ``max_length`` tokens (negative: drop that many). 0 keeps
        everything: llama.cpp's sliding layers need no trimming to their window."""
        keep = self.length + max_length if max_length < 0 else max_length
        if max_length == 0 or keep >= self.length:
            return
        for seq in self.seqs:
            self.model.remove_from(seq, keep)
        self.length = keep

    def crop_tail(self, tokens: int) -> None:
        if tokens > 0:
            self.crop(-tokens)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """One row becomes ``repeats`` rows sharing its cells."""
        assert len(self.seqs) == 1, "only a one-row cache is repeated"
        self.seqs += [self.model.copy_seq(self.seqs[0], self.length) for _ in range(repeats - 1)]

    def batch_select_indices(self, indices) -> None:
        keep = [self.seqs[int(i)] for i in indices]
        for seq in self.seqs:
            if seq not in keep:
                self.model.release(seq)
        self.seqs = keep

    def __deepcopy__(self, memo) -> SequenceKV:
        return self.cut(self.length)

    def cut(self, length: int) -> SequenceKV:
        """A copy holding the first ``length`` states: new sequences sharing those cells."""
        return SequenceKV(self.model, [self.model.copy_seq(seq, length) for seq in self.seqs], length)

    def holds_every_state(self, length: int) -> bool:
        """One row of ``length`` states (``swa_full`` keeps every sliding-window state)."""
        return len(self.seqs) == 1 and self.length == length

    def nbytes(self) -> int:
        return self.length * len(self.seqs) * self.model.kv_bytes_per_token

    def __del__(self):
        for seq in getattr(self, "seqs", ()):
            self.model.release(seq)
        self.seqs = []


class LlamaCppForwards(Forwards):
    """``forward.Forwards`` on a llama.cpp context: the same calls, so generation, scoring and
    the step batcher run unchanged. A batched step puts each session's tokens on its own sequence
    in one ``llama_decode``."""

    backend = "llamacpp"
    # Each token of a decode costs about what a lone one does here (the 4-bit products are bound by
    # arithmetic), so prompt-lookup guesses cost their full price: they made fused generation slower.
    cheap_rows = False
    # A restored prefix shares its entry's cells, so a prefill may resume after any token.
    restore_align = 1

    def __init__(self, model: LlamaCppModel, max_batch: int, fill=None, prefill_chunk: int = DECODE_TOKENS):
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.batcher = StepBatcher(self._single_step, self._batched_step, max_batch, fill=fill)

    def new_cache(self) -> SequenceKV:
        return SequenceKV(self.model)

    def forward(self, rows: list[list[int]], cache: SequenceKV, keep_last: bool) -> np.ndarray:
        """Equally long ``rows``, one per sequence of ``cache``: logits [rows, tokens (or 1), vocab].

        A decode per row: llama.cpp's logits move with what else a decode holds, and a row scored
        alone gets the log-probs a lone decode of it gives. Scoring batches hold one row in the
        usual case anyway (each model reuses its own candidate's)."""
        width = len(rows[0])
        first = width - 1 if keep_last else 0
        logits = [self.model.decode([(seq, cache.length, row, first)])[0] for seq, row in zip(cache.seqs, rows)]
        cache.length += width
        return np.stack(logits)

    def _single_step(self, cache: SequenceKV, tokens: list[int], logits_from: int) -> np.ndarray:
        return self._batched_step([cache], [tokens], [logits_from])[0]

    def _batched_step(self, caches: list, rows: list[list[int]], logits_from: list[int]) -> list[np.ndarray]:
        logits = self.model.decode(
            [(cache.seqs[0], cache.length, row, first) for cache, row, first in zip(caches, rows, logits_from)]
        )
        for cache, row in zip(caches, rows):
            cache.length += len(row)
        return logits


__all__: Sequence[str] = (
    "BACKENDS",
    "LlamaCppForwards",
    "LlamaCppModel",
    "SequenceKV",
    "llamacpp_available",
    "resolve_backend",
)
