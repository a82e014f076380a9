"""What the trainer reads: prepared shards (distill/shards.py's format) fused into sparse soft
targets per text (distill/fusion.py), and the texts packed into fixed-length training blocks.

Packing: the texts are laid end to end, each read after the token its sources' distributions
were externalized after (``Separators``: the target's BOS where its tokenizer puts one before a
text, then ``[BOS] tokens [EOS]``; else the document separator ``<|endoftext|>`` or EOS,
``[SEP] tokens [SEP] tokens ...``), and the stream is cut into blocks of ``seq_len`` tokens; the
last block is padded. Every text token carries its fused soft-target row (the distribution AT
that token, so the position before it is trained towards it); separators and padding carry
none. CLM labels are every token but BOS and padding: a separator is the label that ends the
text before it, as in plain packed pre-training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..services.tokenizer.core import DOCUMENT_SEPARATOR, text_start_id
from .train_options import TrainError


@dataclass(frozen=True)
class Prepared:
    """A prepared directory: its manifest and its completed training shards' tensors."""

    path: Path
    manifest: dict
    shards: list[dict]

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def sources(self) -> list[str]:
        return list(self.manifest["sources"])

    @property
    def target(self) -> str:
        return str(self.manifest["target"])

    def max_token_id(self) -> int:
        return max((int(s["input_ids"].max()) for s in self.shards if s["input_ids"].numel()), default=-1)


def load_prepared(path: str | Path) -> Prepared:
    """The training split of a ``prepare`` output (the shards its manifest lists as complete)."""
    from .shards import ShardError, load_shard, read_manifest, shard_paths

    try:
        manifest = read_manifest(path)
        files = shard_paths(path, "train")
        k, sources = int(manifest["k"]), list(manifest["sources"])
    except ShardError as exc:
        raise TrainError(str(exc)) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise TrainError(f"{path}/manifest.json is not a prepare manifest: {exc!r}") from None
    if not files:
        raise TrainError(f"{path} holds no completed training shard yet: let `coolfusion distill prepare` finish one")
    if k <= 0 or not sources:
        raise TrainError(f"{path}/manifest.json has no sources or k={k}")
    return Prepared(Path(path), manifest, [load_shard(f) for f in files])


def check_k(k: int | None, prepared: Prepared) -> int:
    if k is None:
        return prepared.k
    if not 1 <= k <= prepared.k:
        raise TrainError(f"--k must be in [1, {prepared.k}] (the prepared k), got {k}")
    return k


def fused_texts(prepared: Prepared, method: str, k: int):
    """Per text: (target ids [n], soft ids [n, k] int32, soft probs [n, k] float32), fused by
    ``fusion.fuse_shard`` (each source row cut to its k most probable entries, then fused)."""
    from .fusion import fuse_shard

    for shard in prepared.shards:
        ids, probs = fuse_shard(shard, prepared.sources, method, k)
        offsets = shard["offsets"].tolist()
        for start, end in zip(offsets, offsets[1:], strict=False):
            yield shard["input_ids"][start:end].long(), ids[start:end], probs[start:end]


@dataclass(frozen=True)
class Separators:
    """What the target reads around a text: each text is read after ``start``, the token its
    sources' distributions were externalized after (``text_start_id``: BOS, else the document
    separator, else EOS); after a BOS-started text comes ``end`` (EOS), else the next text's
    start ends it. None: nothing."""

    start: int | None
    start_is_bos: bool
    end: int | None
    pad: int

    @classmethod
    def of(cls, tokenizer) -> Separators:
        probe = tokenizer("a")["input_ids"]
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        adds_bos = bos is not None and bool(probe) and probe[0] == bos
        start = text_start_id(adds_bos, bos, eos, tokenizer.get_vocab().get(DOCUMENT_SEPARATOR))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
        return cls(start, adds_bos, eos if adds_bos else None, pad)


def pack_blocks(texts, seq_len: int, k: int, sep: Separators) -> dict[str, torch.Tensor]:
    """Texts (``fused_texts``) laid end to end and cut into [blocks, seq_len] tensors. A start
    token that is not a BOS is also the previous text's last label (the document separator that
    ends it, as in the target's pretraining)."""
    inputs, labels, soft_ids, soft_probs = [], [], [], []
    none_ids, none_probs = torch.full((1, k), -1, dtype=torch.int32), torch.zeros(1, k)
    for ids, t_ids, t_probs in texts:
        n = ids.shape[0]
        if sep.start is not None:
            inputs.append(torch.tensor([sep.start]))
            labels.append(torch.tensor([-1 if sep.start_is_bos else sep.start]))
            soft_ids.append(none_ids)
            soft_probs.append(none_probs)
        inputs.append(ids)
        labels.append(ids)
        soft_ids.append(t_ids.reshape(n, k))
        soft_probs.append(t_probs.reshape(n, k))
        if sep.end is not None:
            inputs.append(torch.tensor([sep.end]))
            labels.append(torch.tensor([sep.end]))
            soft_ids.append(none_ids)
            soft_probs.append(none_probs)
    if not inputs:
        raise TrainError("the prepared data holds no text")
    stream = [torch.cat(inputs), torch.cat(labels), torch.cat(soft_ids), torch.cat(soft_probs)]
    pad = -len(stream[0]) % seq_len
    fills = (sep.pad, -1, -1, 0.0)
    stream = [torch.cat([t, t.new_full((pad, *t.shape[1:]), f)]) for t, f in zip(stream, fills, strict=True)]
    blocks = [t.reshape(-1, seq_len, *t.shape[1:]) for t in stream]
    return {"input_ids": blocks[0].long(), "labels": blocks[1].long(), "soft_ids": blocks[2], "soft_probs": blocks[3]}


class BlockDataset(Dataset):
    """Packed blocks as the Trainer's dataset: one dict of tensors per block."""

    def __init__(self, blocks: dict[str, torch.Tensor]):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks["input_ids"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.blocks.items()}
