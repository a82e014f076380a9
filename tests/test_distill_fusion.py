"""distill/fusion.py, distill/shards.py and distill/corpus.py: hand-computed oracles, no models."""

from __future__ import annotations

import errno
import json
import math
import os

import numpy as np
import pytest
import torch

from coolfusion.clients.distill_services import task_texts
from coolfusion.distill import corpus, fusion, shards

LOG = math.log


def row(pairs, k=3):
    """(ids [1, k], logprobs [1, k]) from (id, prob) pairs, padded with -1 / -inf."""
    ids = [i for i, _ in pairs] + [-1] * (k - len(pairs))
    lps = [LOG(p) for _, p in pairs] + [-math.inf] * (k - len(pairs))
    return torch.tensor([ids], dtype=torch.int32), torch.tensor([lps], dtype=torch.float16)


# A: {5: .6, 7: .2} -> renormalized {5: .75, 7: .25}; B: {7: .3, 9: .3, 7: .2} -> {7: .625, 9: .375}
ROWS = {"a": row([(5, 0.6), (7, 0.2)]), "b": row([(7, 0.3), (9, 0.3), (7, 0.2)])}
NLL = {"a": 0.5, "b": 1.0}


def test_min_ce_takes_the_lowest_per_byte_nll_renormalized():
    ids, probs = fusion.fuse(ROWS, NLL, "minCE")
    assert ids.tolist() == [[5, 7, -1]]
    assert probs[0].tolist() == pytest.approx([0.75, 0.25, 0.0], abs=1e-3)
    ids, _ = fusion.fuse(ROWS, {"a": 2.0, "b": 1.0}, "mince")  # any case; now b wins
    assert ids.tolist() == [[7, 9, -1]]


def test_avg_ce_weights_are_softmax_of_the_rewards_and_collisions_add():
    # r_m = exp(-nll_m); w = softmax(r): w_a = 1 / (1 + exp(r_b - r_a)) = 0.55938
    w_a = 1 / (1 + math.exp(math.exp(-1.0) - math.exp(-0.5)))
    assert w_a == pytest.approx(0.55938, abs=1e-5)
    assert fusion.source_weights([0.5, 1.0], "avgCE") == pytest.approx([w_a, 1 - w_a])
    expected = {5: 0.75 * w_a, 7: 0.25 * w_a + 0.625 * (1 - w_a), 9: 0.375 * (1 - w_a)}
    ids, probs = fusion.fuse(ROWS, NLL, "avgCE")
    assert ids.tolist() == [[5, 7, 9]]  # 0.4195 > 0.4152 > 0.1652
    assert probs[0].tolist() == pytest.approx([expected[5], expected[7], expected[9]], abs=2e-3)
    # k = 2 first cuts each source to its 2 most probable entries (b: {7: .5, 9: .5}), then keeps the
    # two largest fused ids and renormalizes over them
    ids, probs = fusion.fuse(ROWS, NLL, "avgCE", k=2)
    expected = {5: 0.75 * w_a, 7: 0.25 * w_a + 0.5 * (1 - w_a)}
    kept = expected[5] + expected[7]
    assert ids.tolist() == [[5, 7]]
    assert probs[0].tolist() == pytest.approx([expected[5] / kept, expected[7] / kept], abs=2e-3)


def test_fallback_one_hot_rows_take_part_and_ties_go_to_the_lower_id():
    gold_ids, gold_lps = shards.fallback_rows([9], 3)
    one_hot = (torch.from_numpy(gold_ids), torch.from_numpy(gold_lps))
    ids, probs = fusion.fuse({"a": one_hot, "b": row([(4, 0.5), (2, 0.5)])}, {"a": 1.0, "b": 1.0}, "avgCE")
    assert ids.tolist() == [[9, 2, 4]]  # 0.5 for the one-hot, then the 0.25 tie: lower id first
    assert probs[0].tolist() == pytest.approx([0.5, 0.25, 0.25], abs=1e-3)


def test_bad_fusion_inputs():
    with pytest.raises(fusion.FusionError, match="unknown fusion function 'maxCE'"):
        fusion.fuse(ROWS, NLL, "maxCE")
    with pytest.raises(fusion.FusionError, match="disagree"):
        fusion.fuse({"a": ROWS["a"], "b": (torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3))}, NLL, "avgCE")
    with pytest.raises(fusion.FusionError, match="NLLs"):
        fusion.fuse(ROWS, {"a": 1.0}, "avgCE")


def record(gold, rows, nll):
    """A TextRecord with one aligned row per token (ids/probs per source) and the given NLLs."""
    rec = shards.TextRecord(list(gold), n_bytes=4 * len(gold))
    for s, pairs in rows.items():
        block = [row(p) for p in pairs]
        rec.sources[s] = shards.SourceRows(
            ids=torch.cat([b[0] for b in block]).numpy(),
            logprobs=torch.cat([b[1] for b in block]).numpy(),
            aligned=np.ones(len(gold), dtype=bool),
            nll_per_byte=nll[s],
            ce=2 * nll[s],
            tokens=len(gold) + 1,
        )
    return rec


def two_texts():
    first = record([5, 9], {"a": [[(5, 0.6), (7, 0.2)], [(9, 1.0)]], "b": [[(7, 0.5)], [(8, 0.5)]]}, NLL)
    second = record([7], {"a": [[(5, 0.6), (7, 0.2)]], "b": [[(7, 0.3), (9, 0.3), (7, 0.2)]]}, {"a": 3.0, "b": 1.0})
    return [first, second]


def test_fuse_shard_fuses_each_text_with_its_own_weights():
    tensors = {k: torch.from_numpy(v) for k, v in shards.shard_tensors(two_texts(), ["a", "b"], 3).items()}
    assert tensors["offsets"].tolist() == [0, 2, 3]
    ids, _ = fusion.fuse_shard(tensors, ["a", "b"], "minCE")
    assert ids.tolist() == [[5, 7, -1], [9, -1, -1], [7, 9, -1]]  # a wins text 0, b wins text 1
    assert fusion.min_ce_winners(tensors, ["a", "b"]) == ["a", "b"]


SETTINGS = {"target": "t", "sources": ["a", "b"], "k": 3, "method": "span", "corpus": {"sha256": "x"}, "heldout": 0.1}


def test_shards_round_trip_manifest_and_resume(tmp_path):
    store = shards.ShardStore(tmp_path, SETTINGS)
    assert store.open() == 0
    store.write("train", 0, two_texts())
    store.write("heldout", 0, two_texts()[1:])
    manifest = shards.read_manifest(tmp_path)
    assert [e["file"] for e in manifest["shards"]] == ["shard-00000.safetensors"]
    assert manifest["heldout"]["shards"][0]["file"] == "heldout-00000.safetensors"
    assert manifest["tokens"] == 3 and manifest["texts"] == 2
    assert manifest["text_bytes_per_token"]["target"] == 4.0
    assert manifest["text_bytes_per_token"]["sources"]["a"] == pytest.approx(
        16 / 7
    )  # train and held-out: 16 bytes, 7 tokens
    loaded = shards.load_shard(shards.shard_paths(tmp_path)[0])
    assert loaded["topk_ids.a"].dtype == torch.int32 and loaded["topk_logprobs.b"].dtype == torch.float16
    assert loaded["topk_ids.b"][1].tolist() == [8, -1, -1]
    assert loaded["nll_per_byte.b"].tolist() == [1.0, 1.0] and loaded["ce.a"].tolist() == [1.0, 6.0]
    # resume: the same settings find both shards; a changed shard file is recomputed; other settings refuse
    assert shards.ShardStore(tmp_path, SETTINGS).open() == 2
    (tmp_path / "heldout-00000.safetensors").write_bytes(b"torn")
    again = shards.ShardStore(tmp_path, SETTINGS)
    assert again.open() == 1 and again.done("heldout") == 0
    with pytest.raises(shards.ShardError, match=r"other settings \(k differ\)"):
        shards.ShardStore(tmp_path, {**SETTINGS, "k": 4}).open()


def test_full_disk_lists_no_half_shard(tmp_path, monkeypatch):
    store = shards.ShardStore(tmp_path, SETTINGS)
    store.open()
    store.write("train", 0, two_texts())
    before = (tmp_path / "manifest.json").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shards.os, "fsync", full)
    with pytest.raises(shards.ShardError, match=r"^disk full writing .*shard-00001.safetensors"):
        store.write("train", 1, two_texts())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-00000.safetensors"]
    assert (tmp_path / "manifest.json").read_bytes() == before


def test_corpus_jsonl_errors_name_the_line(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two é"}\n')
    assert corpus.load_corpus([str(good)]).texts == ["one", "two é"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "two"\n')
    with pytest.raises(corpus.CorpusError, match=r"bad.jsonl:2: not JSON"):
        corpus.load_corpus([str(bad)])
    bad.write_text('{"text": "one"}\n{"body": "two"}\n')
    with pytest.raises(corpus.CorpusError, match=r"bad.jsonl:2: .*non-empty string 'text'"):
        corpus.load_corpus([str(bad)])
    with pytest.raises(corpus.CorpusError, match="corpus not found"):
        corpus.load_corpus([str(tmp_path / "missing.jsonl")])


def test_task_texts_and_a_stable_heldout_slice(monkeypatch, tmp_path):
    (tmp_path / "arc").mkdir()
    arc = {"id": "q1", "question": "Which is a gas?", "choices": {"text": ["rock", "air"], "label": ["A", "B"]}}
    (tmp_path / "arc" / "ARC-Easy-train.jsonl").write_text(json.dumps({**arc, "answerKey": "B"}) + "\n")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2\n#### 2"}) + "\n")
    monkeypatch.setenv("COOLFUSION_DATA_DIR", str(tmp_path))
    with pytest.raises(corpus.CorpusError, match="no reader for task files"):
        corpus.load_corpus(["arc-easy"])
    texts = corpus.load_corpus(["arc-easy", "gsm8k"], task_texts=task_texts).texts
    assert texts == ["Question: Which is a gas?\nAnswer: air", "Question: 1+1?\nAnswer: 2\n#### 2"]
    many = [f"text {i}" for i in range(2000)]
    train, heldout = corpus.split_heldout(many, 0.1)
    assert 150 < len(heldout) < 250 and len(train) + len(heldout) == 2000
    assert corpus.split_heldout(list(reversed(many)), 0.1)[1] == list(reversed(heldout))  # by text, not position
