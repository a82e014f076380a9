"""``coolfusion distill prepare`` (distill/prepare.py): control flow against a fake of the
services (tests/distill_fake.py), then the real pipeline on the bundled models (slow)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from coolfusion.clients.cli import main as cli_main
from coolfusion.distill import corpus as corpus_mod
from coolfusion.distill import shards
from coolfusion.distill.prepare import PrepareError, Reporter, completed, prepare

sys.path.insert(0, str(Path(__file__).parent))
from distill_fake import TEXTS, FakeRemote, options, tokens  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture
def corpus_file(tmp_path) -> str:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS))
    return str(path)


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


class StopAfter(Reporter):
    """Raises after ``n`` texts: a kill at that point (the shard in progress is not written)."""

    def __init__(self, n: int):
        self.n = n

    def text_done(self, tokens: int) -> None:
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt


def test_rows_are_the_aligned_mapped_top_k_else_the_gold_one_hot(tmp_path, corpus_file):
    result = prepare(options(corpus_file, str(tmp_path / "out")), FakeRemote())
    manifest = shards.read_manifest(tmp_path / "out")
    train, heldout = corpus_mod.split_heldout(TEXTS, 0.1)
    assert manifest["complete"] and manifest["texts"] == len(train) and result["heldout_texts"] == len(heldout)
    assert 0 < len(heldout) < len(TEXTS)
    fake, checked = FakeRemote(), 0
    for split, texts in (("train", train), ("heldout", heldout)):
        loaded = [shards.load_shard(p) for p in shards.shard_paths(tmp_path / "out", split)]
        for i, text in enumerate(texts):
            shard, j = loaded[i // 2], i % 2
            lo, hi = shard["offsets"][j : j + 2].tolist()
            for source in ("words", "triples"):
                dist = fake.distributions(source, [text], 4)[0]
                alignment = fake.align(source, "t", text, dist, "span")
                assert shard["input_ids"][lo:hi].tolist() == alignment.target_ids
                ids, lps = shard[f"topk_ids.{source}"][lo:hi], shard[f"topk_logprobs.{source}"][lo:hi].float()
                for t, src in enumerate(alignment.source_index):
                    if src >= 0:
                        assert ids[t].tolist() == alignment.mapped_ids[t]
                        assert lps[t].tolist() == pytest.approx(alignment.mapped_logprobs[t], abs=2e-3)
                    else:  # the one-hot on the gold token AT t (not the one before)
                        assert ids[t].tolist() == [alignment.target_ids[t], -1, -1, -1]
                        assert lps[t][0] == 0 and all(math.isinf(x) for x in lps[t][1:].tolist())
                    checked += 1
                assert shard[f"aligned.{source}"][lo:hi].tolist() == [s >= 0 for s in alignment.source_index]
                n_bytes = len(text.encode())
                assert float(shard[f"nll_per_byte.{source}"][j]) == pytest.approx(-sum(dist.gold_logprobs) / n_bytes)
                assert float(shard[f"ce.{source}"][j]) == pytest.approx(dist.ce)
    assert checked == 2 * (manifest["tokens"] + manifest["heldout"]["tokens"])
    assert manifest["aligned_fraction"]["words"] == 1.0 and 0.2 < manifest["aligned_fraction"]["triples"] < 0.8
    assert result["bytes_per_token_per_source"] < 500


def test_a_kill_then_a_rerun_writes_the_same_bytes(tmp_path, corpus_file, monkeypatch):
    whole = tmp_path / "whole"
    prepare(options(corpus_file, str(whole)), FakeRemote())
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):  # after 3 texts: shard 0 listed, shard 1 half computed
        prepare(options(corpus_file, str(killed)), FakeRemote(), StopAfter(3))
    assert [e["file"] for e in shards.read_manifest(killed)["shards"]] == ["shard-00000.safetensors"]
    texts = corpus_mod.load_corpus([corpus_file])
    assert completed(options(corpus_file, str(killed)), texts) is None  # work left: the CLI starts services
    result = prepare(options(corpus_file, str(killed)), FakeRemote())
    assert result["resumed_shards"] == 1 and result["computed_texts"] == len(TEXTS) - 2
    assert files(killed) == files(whole)
    again = completed(options(corpus_file, str(killed)), texts)  # nothing left: no service needed
    assert again["resumed_shards"] == 3 and again["tokens"] == result["tokens"] and again["tokens_per_s"] is None
    assert files(killed) == files(whole)
    # killed between a shard file and the manifest that lists it: the file is written again
    between = tmp_path / "between"
    real = shards.ShardStore.write_manifest
    calls = {"n": 0}

    def dies_on_second(self, complete):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, complete)

    monkeypatch.setattr(shards.ShardStore, "write_manifest", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare(options(corpus_file, str(between)), FakeRemote())
    monkeypatch.setattr(shards.ShardStore, "write_manifest", real)
    assert len(shards.read_manifest(between)["shards"]) == 1 and (between / "shard-00001.safetensors").exists()
    prepare(options(corpus_file, str(between)), FakeRemote())
    assert files(between) == files(whole)


def test_sigkill_mid_run_then_resume(tmp_path, corpus_file):
    whole = tmp_path / "whole"
    prepare(options(corpus_file, str(whole)), FakeRemote())
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, str(HERE / "distill_fake.py"), corpus_file, str(out), "0.15"])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out / "manifest.json").exists():
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not shards.read_manifest(out)["complete"]
    prepare(options(corpus_file, str(out)), FakeRemote())
    assert {k: v for k, v in files(out).items() if not k.startswith(".")} == files(whole)


def test_bad_options_and_services_write_nothing(tmp_path, corpus_file):
    out = tmp_path / "out"
    cases = [
        (dict(k=0), "k must be at least 1, got 0"),
        (dict(k=1001), "k=1001 is larger than t's vocabulary (1000 tokens)"),
        (dict(target="nope"), "unknown target tokenizer 'nope': the tokenizer service hosts t, words, triples"),
        (dict(sources=["words", "other"]), "hosts no tokenizer for source other"),
        (dict(method="fast"), "unknown alignment method 'fast'"),
        (dict(heldout=1.0), "--heldout is a fraction in [0, 1)"),
    ]
    for change, message in cases:
        with pytest.raises(PrepareError) as info:
            prepare(options(corpus_file, str(out), **change), FakeRemote())
        assert message in str(info.value) and "\n" not in str(info.value)
        assert not out.exists()

    class Refused(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

        def details(self):
            return "no"

    for code, status in ((grpc.StatusCode.INVALID_ARGUMENT, 2), (grpc.StatusCode.UNAVAILABLE, 1)):
        remote = FakeRemote()
        remote.distributions = lambda *a, code=code: (_ for _ in ()).throw(Refused(code))
        with pytest.raises(PrepareError, match=f"^{code.name}: no$") as info:
            prepare(options(corpus_file, str(out)), remote)
        assert info.value.code == status and not list(out.iterdir())
    prepare(options(corpus_file, str(out)), FakeRemote())
    with pytest.raises(shards.ShardError, match=r"other settings \(k differ\)"):
        prepare(options(corpus_file, str(out), k=5), FakeRemote())


def test_cli_bad_input_exits_2_with_one_line_before_any_service(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    out = str(tmp_path / "out")
    cases = [
        ([str(bad)], f"{bad}:2: not JSON"),
        ([str(bad), "--k", "0"], "k must be at least 1"),
        ([str(bad), "--heldout", "2"], "--heldout is a fraction"),
        (["arc-easy", "--sources", "smollm2,nosuch"], "unknown model 'nosuch'"),
        (["arc-easy", "--target", "nosuch"], "unknown model 'nosuch'"),
        (["arc-easy", "--connect", "127.0.0.1:1"], "--connect needs --tokenizer-service"),
    ]
    for extra, message in cases:
        assert cli_main(["distill", "prepare", *extra, "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not Path(out).exists()


def test_fake_tokens_cover_multibyte_text():
    text = "emoji 🙂 漢"
    assert [text.encode()[a:b].decode() for a, b in tokens(text, "words")] == ["emoji", " 🙂", " 漢"]
    assert b"".join(text.encode()[a:b] for a, b in tokens(text, "triples")) == text.encode()


# ---- the real pipeline on the bundled models (slow) --------------------------------------------
CORPUS = str(HERE / "data" / "distill-corpus.jsonl")  # 4 short texts: ASCII, digits, accents + emoji, CJK


def real_options(out, **kw):
    from coolfusion.distill.prepare import PrepareOptions

    settings = dict(target="smollm2", sources=["smollm2", "gemma3"], k=4, heldout=0.0, shard_texts=2, batch_texts=2)
    return PrepareOptions([CORPUS], str(out), **{**settings, **kw})


async def test_prepare_on_the_bundled_models_against_a_recomputation(cluster, tmp_path):
    import asyncio

    from coolfusion.clients.distill_services import connected
    from coolfusion.distill.remote import Remote, RemoteError
    from coolfusion.services.tokenizer.alignment import map_topk, text_tokens, vocab_map
    from coolfusion.services.worker.client import distributions_blocking

    sources = ["smollm2", "gemma3"]
    remote = Remote(cluster.tokenizer_address, {s: cluster.worker_addresses[s] for s in sources})
    result = await asyncio.to_thread(prepare, real_options(tmp_path / "whole"), remote)
    texts = corpus_mod.load_corpus([CORPUS]).texts
    assert result["texts"] == len(texts) and result["tokens_per_s"] > 0
    assert result["sources"]["gemma3"]["tokens_per_s"] > 0 and result["bytes_per_token_per_source"] < 500
    target = cluster.registry.get("smollm2")
    loaded = [shards.load_shard(p) for p in shards.shard_paths(tmp_path / "whole")]
    for pair in (0, 1):  # the oracle asks each worker for the same batches prepare sent
        batch = texts[2 * pair : 2 * pair + 2]
        shard = loaded[pair]
        for s in sources:
            dists = await asyncio.to_thread(
                lambda s=s, batch=batch: list(distributions_blocking(cluster.worker_addresses[s], batch, 4))
            )
            vmap = vocab_map(cluster.registry.get(s), target)
            for j, (text, dist) in enumerate(zip(batch, dists)):
                lo, hi = shard["offsets"][j : j + 2].tolist()
                target_ids, target_spans = text_tokens(target, text)
                assert shard["input_ids"][lo:hi].tolist() == target_ids
                by_start = {start: i for i, start in enumerate(dist.starts)}
                ids, lps = shard[f"topk_ids.{s}"][lo:hi], shard[f"topk_logprobs.{s}"][lo:hi].float()
                aligned = shard[f"aligned.{s}"][lo:hi].tolist()
                for t, (start, _) in enumerate(target_spans):
                    i = by_start.get(start, -1)
                    assert aligned[t] == (i >= 0)
                    if i < 0:
                        assert ids[t].tolist() == [target_ids[t], -1, -1, -1] and lps[t][0] == 0
                        continue
                    want_ids, want_lps = map_topk(dist.topk_ids[i], dist.topk_logprobs[i], vmap, 4)
                    assert ids[t].tolist() == want_ids
                    assert lps[t].tolist() == pytest.approx(want_lps, abs=1e-2)
                    if s == "smollm2":  # the target itself: every token aligned, the map the identity
                        assert want_ids == dist.topk_ids[i]
                if s == "smollm2":
                    assert all(aligned)
                n_bytes = len(text.encode())
                assert float(shard[f"nll_per_byte.{s}"][j]) == pytest.approx(
                    -sum(dist.gold_logprobs) / n_bytes, rel=1e-5
                )
    # a kill after 3 texts, then a rerun: the same bytes
    with pytest.raises(KeyboardInterrupt):
        await asyncio.to_thread(prepare, real_options(tmp_path / "killed"), remote, StopAfter(3))
    resumed = await asyncio.to_thread(prepare, real_options(tmp_path / "killed"), remote)
    assert resumed["resumed_shards"] == 1 and files(tmp_path / "killed") == files(tmp_path / "whole")
    # --connect: the orchestrator names the workers; a source it does not serve is one line
    served = await asyncio.to_thread(connected, cluster.address, cluster.tokenizer_address, sources)
    vocab = await asyncio.to_thread(served.vocab_size, "gemma3")
    assert vocab == cluster.cores["gemma3"].info()["vocab_size"]
    served.close()
    with pytest.raises(
        RemoteError, match=r"^source nosuch is not served by .* \(it serves smollm2, gemma3, smollm2b\)$"
    ):
        await asyncio.to_thread(connected, cluster.address, cluster.tokenizer_address, ["smollm2", "nosuch"])
    with pytest.raises(PrepareError, match=r"k=300000 is larger than smollm2's vocabulary \(49152 tokens\)"):
        await asyncio.to_thread(prepare, real_options(tmp_path / "big", k=300000), remote)
    remote.close()
