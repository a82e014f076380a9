"""The shard format ``prepare`` writes and ``train`` reads.

``<out>/shard-00000.safetensors`` ... hold the training texts, ``<out>/heldout-00000.safetensors``
... the held-out slice; ``<out>/manifest.json`` lists the completed ones and is rewritten, through a
temporary file and ``os.replace``, only after a shard file is complete on disk. A shard is in the
dataset exactly when the manifest lists it, so a kill at any point leaves a valid, shorter dataset,
and a rerun recomputes from the first shard not listed (same texts, same requests: the same bytes).
A full disk while a shard or the manifest is written is a ``ShardError`` naming it; the partial
file is removed and nothing half-written is listed.

Tensors of one shard (T target tokens over N texts, k entries per row):

- ``input_ids`` int32 [T]: the target's tokens, texts concatenated, no BOS;
- ``offsets`` int64 [N+1]: text i is ``input_ids[offsets[i]:offsets[i+1]]``;
- per source s: ``topk_ids.<s>`` int32 [T, k] and ``topk_logprobs.<s>`` float16 [T, k] (row t: s's
  distribution AT target token t, mapped to the target vocabulary; padding id -1 / -inf),
  ``aligned.<s>`` bool [T] (False: the row is the fallback one-hot on ``input_ids[t]``),
  ``nll_per_byte.<s>`` float32 [N] and ``ce.<s>`` float32 [N] (mean per-token CE in s's own tokens).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "coolfusion-distill/1"
SPLITS = {"train": "shard", "heldout": "heldout"}


class ShardError(RuntimeError):
    """A dataset that cannot be written or resumed; the message is one line."""


@dataclass
class SourceRows:
    """One source's rows for one text, on the target's positions and vocabulary."""

    ids: np.ndarray  # int32 [n, k]
    logprobs: np.ndarray  # float16 [n, k]
    aligned: np.ndarray  # bool [n]
    nll_per_byte: float
    ce: float
    tokens: int  # the source's own tokens of the text


@dataclass
class TextRecord:
    input_ids: list[int]
    n_bytes: int
    sources: dict[str, SourceRows] = field(default_factory=dict)


def fallback_rows(gold: Sequence[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """One-hot rows on the gold target token at each position: logprob 0 there, padding elsewhere."""
    ids = np.full((len(gold), k), -1, dtype=np.int32)
    logprobs = np.full((len(gold), k), -np.inf, dtype=np.float16)
    ids[:, 0] = np.asarray(gold, dtype=np.int32)
    logprobs[:, 0] = 0.0
    return ids, logprobs


def shard_tensors(records: Sequence[TextRecord], sources: Sequence[str], k: int) -> dict[str, np.ndarray]:
    lengths = [len(r.input_ids) for r in records]
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    tensors = {
        "input_ids": np.asarray([t for r in records for t in r.input_ids], dtype=np.int32),
        "offsets": offsets,
    }
    for s in sources:
        rows = [r.sources[s] for r in records]
        tensors[f"topk_ids.{s}"] = np.concatenate([x.ids for x in rows]).astype(np.int32).reshape(-1, k)
        tensors[f"topk_logprobs.{s}"] = np.concatenate([x.logprobs for x in rows]).astype(np.float16).reshape(-1, k)
        tensors[f"aligned.{s}"] = np.concatenate([x.aligned for x in rows]).astype(np.bool_)
        tensors[f"nll_per_byte.{s}"] = np.asarray([x.nll_per_byte for x in rows], dtype=np.float32)
        tensors[f"ce.{s}"] = np.asarray([x.ce for x in rows], dtype=np.float32)
    return tensors


def shard_name(split: str, index: int) -> str:
    return f"{SPLITS[split]}-{index:05d}.safetensors"


def read_manifest(out: str | Path) -> dict:
    path = Path(out) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path} not found: run `coolfusion distill prepare --out {out}` first") from None
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: not JSON ({exc.msg})") from None


def shard_paths(out: str | Path, split: str = "train") -> list[Path]:
    """The completed shards of a split, in order (``split``: train or heldout)."""
    manifest = read_manifest(out)
    entries = manifest["shards"] if split == "train" else manifest["heldout"]["shards"]
    return [Path(out) / e["file"] for e in entries]


def load_shard(path: str | Path) -> dict:
    """A shard's tensors as torch tensors."""
    from safetensors.torch import load_file

    return load_file(str(path))


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` at ``path`` through a temporary file; ENOSPC/EDQUOT is a ShardError, nothing left."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ShardError(
                f"disk full writing {path} ({exc.strerror}); nothing half-written is listed: free space and rerun to resume"
            ) from None
        raise ShardError(f"cannot write {path}: {exc.strerror or exc}") from None


class ShardStore:
    """The output folder of one ``prepare``: which shards are done, writing the next one."""

    def __init__(self, out: str | Path, settings: dict):
        self.out = Path(out)
        self.settings = settings  # target, sources, k, method, corpus, heldout fraction: must match to resume
        self.entries: dict[str, list[dict]] = {"train": [], "heldout": []}

    def open(self) -> int:
        """Create the folder or resume it; returns the number of shards already done."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ShardError(f"cannot create {self.out}: {exc.strerror or exc}") from None
        if not (self.out / MANIFEST).exists():
            return 0
        manifest = read_manifest(self.out)
        if manifest.get("settings") != self.settings:
            theirs = manifest.get("settings") or {}
            differ = sorted(k for k in set(theirs) | set(self.settings) if theirs.get(k) != self.settings.get(k))
            raise ShardError(
                f"{self.out} holds a prepare with other settings ({', '.join(differ)} differ): use another --out"
            )
        self.entries = {"train": list(manifest["shards"]), "heldout": list(manifest["heldout"]["shards"])}
        for split in SPLITS:
            self.entries[split] = self._verified(self.entries[split])
        return sum(len(v) for v in self.entries.values())

    def _verified(self, entries: list[dict]) -> list[dict]:
        """The listed shards up to the first one missing or changed on disk (those get recomputed)."""
        kept = []
        for entry in entries:
            try:
                data = (self.out / entry["file"]).read_bytes()
            except OSError:
                break
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                break
            kept.append(entry)
        return kept

    def done(self, split: str) -> int:
        return len(self.entries[split])

    def write(self, split: str, index: int, records: Sequence[TextRecord]) -> dict:
        """Write shard ``index`` of ``split``, then list it in the manifest."""
        from safetensors.numpy import save

        if index != len(self.entries[split]):
            raise ShardError(f"shard {index} of {split} written out of order")
        sources, k = self.settings["sources"], self.settings["k"]
        data = save(shard_tensors(records, sources, k), metadata={"format": FORMAT})
        name = shard_name(split, index)
        _write_atomic(self.out / name, data)
        entry = {
            "file": name,
            "texts": len(records),
            "tokens": sum(len(r.input_ids) for r in records),
            "text_bytes": sum(r.n_bytes for r in records),
            "source_tokens": {s: sum(r.sources[s].tokens for r in records) for s in sources},
            "aligned": {s: int(sum(r.sources[s].aligned.sum() for r in records)) for s in sources},
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        self.entries[split].append(entry)
        self.write_manifest(complete=False)
        return entry

    def write_manifest(self, complete: bool) -> dict:
        manifest = self.manifest(complete)
        _write_atomic(self.out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        return manifest

    def manifest(self, complete: bool) -> dict:
        s = self.settings
        every = self.entries["train"] + self.entries["heldout"]
        tokens = sum(e["tokens"] for e in every)
        text_bytes = sum(e["text_bytes"] for e in every)
        n_sources = len(s["sources"])
        return {
            "format": FORMAT,
            "target": s["target"],
            "sources": s["sources"],
            "k": s["k"],
            "method": s["method"],
            "settings": s,
            "complete": complete,
            "corpus": s["corpus"],
            "texts": sum(e["texts"] for e in self.entries["train"]),
            "tokens": sum(e["tokens"] for e in self.entries["train"]),
            "shards": self.entries["train"],
            "heldout": {
                "fraction": s["heldout"],
                "texts": sum(e["texts"] for e in self.entries["heldout"]),
                "tokens": sum(e["tokens"] for e in self.entries["heldout"]),
                "shards": self.entries["heldout"],
            },
            # storage: shard bytes per target token per source (everything counted, input_ids too)
            "bytes_per_token_per_source": sum(e["bytes"] for e in every) / max(1, tokens * n_sources),
            # the text: UTF-8 bytes per token of each tokenizer (the target's and each source's own)
            "text_bytes_per_token": {
                "target": text_bytes / max(1, tokens),
                "sources": {
                    name: text_bytes / max(1, sum(e["source_tokens"][name] for e in every)) for name in s["sources"]
                },
            },
            "aligned_fraction": {
                name: sum(e["aligned"][name] for e in every) / max(1, tokens) for name in s["sources"]
            },
        }
