"""``coolfusion distill train`` / ``export`` (distill/train.py, soft_loss.py, train_data.py,
export.py): the loss against a plain full-vocabulary recomputation, the chunked output layer's
gradient, λ = 1 against the model's own CLM loss, kill-and-resume against an uninterrupted run,
bad options, and an export served by a worker core against transformers' greedy generate.

The shards are written here with distill/shards.py's writer from synthetic source rows; the
target is SmolLM2-135M (the bundled GGUF, dequantised as a worker loads it) or, where only the
control flow matters, a one-layer model with SmolLM2's tokenizer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from coolfusion.distill.shards import ShardStore, SourceRows, TextRecord
from coolfusion.distill.soft_loss import distill_loss
from coolfusion.distill.train import CURVE_FILE, TrainOptions, load_target, train
from coolfusion.distill.train_data import Separators, fused_texts, load_prepared, pack_blocks

TEXTS = [
    "Question: Which gas do plants take in for photosynthesis? Answer: carbon dioxide",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "The moon orbits the Earth about once every 27 days; its phases repeat every 29.5 days.",
]
SOURCES = ("smollm2", "gemma3")
K = 4


def write_shards(out: Path, tokenizer, texts=TEXTS, k: int = K, seed: int = 0) -> Path:
    """A prepared directory for ``texts``: random source rows on the target's vocabulary, some
    fallback one-hots, some padded entries, some ids shared between the sources."""
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)
    records = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        record = TextRecord(ids, len(text.encode()))
        common = rng.integers(0, vocab, size=len(ids))
        for s, name in enumerate(SOURCES):
            rows = rng.integers(0, vocab, size=(len(ids), k)).astype(np.int32)
            rows[:, s] = common  # both sources propose this id: fusion adds its probabilities
            logits = rng.normal(size=(len(ids), k + 1)) * 2
            logprobs = (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))[:, :k]
            logprobs[1::5, k - 1] = -np.inf  # a padded entry
            rows[1::5, k - 1] = -1
            aligned = rng.random(len(ids)) > 0.2
            rows[~aligned] = -1
            logprobs[~aligned] = -np.inf
            rows[~aligned, 0] = np.asarray(ids)[~aligned]
            logprobs[~aligned, 0] = 0.0
            record.sources[name] = SourceRows(
                rows, logprobs.astype(np.float16), aligned, float(rng.uniform(0.5, 1.5)), 2.0, len(ids)
            )
        records.append(record)
    settings = {"target": "smollm2", "sources": list(SOURCES), "k": k, "method": "span", "corpus": "test", "heldout": 0}
    store = ShardStore(out, settings)
    store.open()
    store.write("train", 0, records)
    store.write_manifest(complete=True)
    return out


def direct_fused(prepared_dir: Path, method: str, k: int):
    """Per text (ids, {target id: prob}) per position, fused from the stored rows by hand."""
    from safetensors.numpy import load_file

    shard = load_file(str(prepared_dir / "shard-00000.safetensors"))
    offsets = shard["offsets"].tolist()
    out = []
    for t, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
        nll = np.array([shard[f"nll_per_byte.{s}"][t] for s in SOURCES], dtype=np.float64)
        weights = np.exp(np.exp(-nll)) / np.exp(np.exp(-nll)).sum() if method == "avgCE" else np.eye(2)[nll.argmin()]
        rows = []
        for pos in range(lo, hi):
            dist: dict[int, float] = {}
            for s, name in enumerate(SOURCES):
                entries = [
                    (float(lp), int(i))
                    for i, lp in zip(shard[f"topk_ids.{name}"][pos], shard[f"topk_logprobs.{name}"][pos])
                    if i >= 0
                ]
                entries = sorted(entries, reverse=True)[:k]
                mass = sum(math.exp(lp) for lp, _ in entries)
                for lp, i in entries:
                    dist[i] = dist.get(i, 0.0) + weights[s] * math.exp(lp) / mass
            kept = sorted(dist.items(), key=lambda kv: -kv[1])[:k]
            total = sum(p for _, p in kept)
            rows.append({i: p / total for i, p in kept if p > 0})
        out.append((shard["input_ids"][lo:hi].tolist(), rows))
    return out


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, _ = load_target("smollm2")
    return model, tokenizer


def options(tmp_path: Path, prepared: Path, **kw) -> TrainOptions:
    base = dict(prepared=str(prepared), out=str(tmp_path / "run"), seq_len=32, batch_size=8, max_steps=1, lr=1e-4)
    return TrainOptions(**{**base, **kw})


def curve(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / CURVE_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def one_step(tmp_path_factory, smollm2):
    """A one-step SmolLM2 run: all blocks in one batch, so the step's loss is the mean over every
    position whatever the order; avgCE with k = 3 of the prepared 4, chunks of 7 positions."""
    tmp_path = tmp_path_factory.mktemp("one_step")
    prepared = write_shards(tmp_path / "prep", smollm2[1])
    train(options(tmp_path, prepared, lam=0.3, fusion="avgce", k=3, chunk=7, target="smollm2"))
    return tmp_path, prepared


@pytest.mark.slow
def test_one_step_loss_equals_a_direct_recomputation(one_step, smollm2):
    model, tokenizer = smollm2
    tmp_path, prepared = one_step
    logged = curve(tmp_path / "run")
    assert [line["step"] for line in logged] == [1]

    # The oracle: the texts packed by hand, the untouched model's dense logits, plain log_softmax.
    # SmolLM2 puts no BOS before a text: each text is read after the document separator, the
    # token its sources' distributions were externalized after.
    assert tokenizer("a")["input_ids"][0] != tokenizer.bos_token_id
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream, rows = [], []
    for ids, text_rows in direct_fused(prepared, "avgCE", 3):
        stream += [separator] + ids
        rows += [None] + text_rows
    clm, kd, n_clm, n_kd = 0.0, 0.0, 0, 0
    for start in range(0, len(stream), 32):
        block = stream[start : start + 32]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([block])).logits[0].double(), -1)
        for p in range(len(block) - 1):
            clm -= float(logp[p, block[p + 1]])
            n_clm += 1
            target = rows[start + p + 1]
            if target:
                kd -= sum(q * float(logp[p, i]) for i, q in target.items())
                n_kd += 1
    expected = 0.3 * clm / n_clm + 0.7 * kd / n_kd
    assert logged[0]["clm"] == pytest.approx(clm / n_clm, rel=1e-5)
    assert logged[0]["kd"] == pytest.approx(kd / n_kd, rel=1e-5)
    assert logged[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert logged[0]["tokens"] == 32 * math.ceil(len(stream) / 32)
    assert (tmp_path / "run" / "model" / "config.json").exists()


@pytest.mark.slow
def test_texts_are_trained_after_the_token_distributions_read_them_after(tmp_path, smollm2):
    """The start token the worker's Distributions reads a text after (``start_ids``) is the one
    packing puts before each text, for SmolLM2 (a document separator) and Gemma-3 (its BOS)."""
    from coolfusion.services.sources import parse_spec
    from coolfusion.services.tokenizer.loading import load_tokenizer
    from coolfusion.services.worker.distributions import start_ids

    for name in ("smollm2", "gemma3"):
        core = load_tokenizer(parse_spec(name))
        sep = Separators.of(core.hf)
        assert [sep.start] == start_ids(core) and sep.start_is_bos == (name == "gemma3"), name
    tokenizer = smollm2[1]
    sep = Separators.of(tokenizer)
    assert sep.start == tokenizer.convert_tokens_to_ids("<|endoftext|>") and sep.end is None
    blocks = pack_blocks(
        fused_texts(load_prepared(write_shards(tmp_path / "prep", tokenizer)), "minCE", K), 512, K, sep
    )
    stream, labels = blocks["input_ids"][0].tolist(), blocks["labels"][0].tolist()
    firsts = [tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in TEXTS]
    starts = [i for i, t in enumerate(stream) if t == sep.start][: len(TEXTS)]
    assert [stream[i + 1] for i in starts] == firsts and starts[0] == 0
    assert all(labels[i] == sep.start for i in starts)  # the separator ends the text before it


def blocks_of(tokenizer, tmp_path: Path, seq_len: int = 24) -> dict:
    prepared = load_prepared(write_shards(tmp_path / "prep", tokenizer))
    blocks = pack_blocks(fused_texts(prepared, "minCE", K), seq_len, K, Separators.of(tokenizer))
    return {name: t[:2] for name, t in blocks.items()}


@pytest.mark.slow
def test_lambda_one_is_the_models_own_clm_loss(tmp_path, smollm2):
    model, tokenizer = smollm2
    batch = blocks_of(tokenizer, tmp_path)
    with torch.no_grad():
        ours = distill_loss(model, batch["input_ids"], batch["labels"], batch["soft_ids"], batch["soft_probs"], 1.0, 5)
        labels = torch.where(batch["labels"] >= 0, batch["labels"], -100)  # the model shifts them itself
        theirs = model(input_ids=batch["input_ids"], labels=labels).loss
    assert float(ours.loss) == pytest.approx(float(theirs), rel=1e-5)
    assert float(ours.clm) == pytest.approx(float(theirs), rel=1e-5) and ours.kd_positions > 0


def test_chunked_gradient_equals_the_dense_gradient(tmp_path, tiny_target):
    """Chunks of 5 positions under checkpointing against the loss written densely, in float64
    (in float32 the two summation orders differ by more than the check could bound)."""
    from transformers import AutoModelForCausalLM

    spec, tokenizer = tiny_target
    model = AutoModelForCausalLM.from_pretrained(spec.split("=", 1)[1], dtype=torch.float64)
    batch = blocks_of(tokenizer, tmp_path)
    args = (batch["input_ids"], batch["labels"], batch["soft_ids"], batch["soft_probs"].double())

    def dense_loss():
        logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1], -1)
        labels, ids, probs = batch["labels"][:, 1:], batch["soft_ids"][:, 1:].long(), args[3][:, 1:]
        gold = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        clm = -(gold * (labels >= 0)).sum() / (labels >= 0).sum()
        soft = (logp.gather(-1, ids.clamp(min=0)) * probs * (ids >= 0)).sum(-1)
        kd = -soft.sum() / (ids >= 0).any(-1).sum()
        return 0.4 * clm + 0.6 * kd

    def grads(loss_fn):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    chunked_loss, chunked = grads(lambda: distill_loss(model, *args, lam=0.4, chunk=5).loss)
    dense_loss_value, dense = grads(dense_loss)
    assert chunked_loss == pytest.approx(dense_loss_value, rel=1e-12)
    assert chunked.keys() == dense.keys() and len(chunked) >= 8
    for name in dense:
        torch.testing.assert_close(chunked[name], dense[name], rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    """``tiny=DIR``: a one-layer Llama with SmolLM2's tokenizer, a local directory as a worker takes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from coolfusion.services.sources import load_hf_tokenizer, parse_spec

    tokenizer = load_hf_tokenizer(parse_spec("smollm2"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return f"tiny={folder}", tokenizer


class Crash(Exception):
    pass


class CrashAt:
    """Raises in ``on_log`` of ``step``: after the step's curve line, before its checkpoint."""

    def __init__(self, step: int):
        from transformers import TrainerCallback

        self.step = step
        self.callback = type("CrashCallback", (TrainerCallback,), {"on_log": self.on_log})()

    def on_log(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash(self.step)


def test_kill_and_resume_reproduces_the_loss_curve(tmp_path, tiny_target):
    spec, tokenizer = tiny_target
    prepared = write_shards(tmp_path / "prep", tokenizer)
    run = dict(target=spec, lam=0.5, max_steps=6, batch_size=2, seq_len=16, save_steps=1, warmup=2, lr=1e-2)
    whole = options(tmp_path, prepared, **run, out=str(tmp_path / "whole"))
    train(whole)
    expected = curve(tmp_path / "whole")
    assert [line["step"] for line in expected] == [1, 2, 3, 4, 5, 6]
    assert len({line["loss"] for line in expected}) == 6 and expected[-1]["loss"] < expected[0]["loss"]
    assert expected[0]["lr"] == 0.0 and expected[2]["lr"] == pytest.approx(1e-2)  # warm-up, then cosine

    parted = options(tmp_path, prepared, **run, out=str(tmp_path / "parted"))
    with pytest.raises(Crash):
        train(parted, callbacks=(CrashAt(4).callback,))
    out = tmp_path / "parted"
    assert len(curve(out)) == 4 and not (out / "checkpoint-4").exists()
    (out / "checkpoint-9").mkdir()  # a checkpoint a kill cut short: no trainer_state.json
    (out / "checkpoint-9" / "model.safetensors").write_bytes(b"partial")
    train(parted)
    assert not (out / "checkpoint-9").exists()
    resumed = curve(out)
    assert [line["step"] for line in resumed] == [1, 2, 3, 4, 5, 6]
    for ours, theirs in zip(resumed, expected):
        assert (ours["loss"], ours["clm"], ours["kd"], ours["lr"]) == (
            theirs["loss"],
            theirs["clm"],
            theirs["kd"],
            theirs["lr"],
        )
    assert (out / "model" / "config.json").exists()
    # Rerunning a finished run changes nothing; other options are refused, one line.
    assert train(parted) == out / "model" and len(curve(out)) == 6
    from coolfusion.distill.train_options import TrainError

    with pytest.raises(TrainError, match="other options"):
        train(options(tmp_path, prepared, **{**run, "lam": 0.6}, out=str(out)))


def cli(capsys, *args: str) -> tuple[int, str]:
    from coolfusion.clients.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


def test_bad_options_exit_2_with_one_line_and_write_nothing(tmp_path, tiny_target, capsys):
    spec, tokenizer = tiny_target
    prepared = str(write_shards(tmp_path / "prep", tokenizer))
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text('{"model_type": "llama"}')
    out = tmp_path / "run"
    cases = {
        ("--lambda", "1.5"): "--lambda must be in [0, 1], got 1.5",
        ("--lambda", "-0.1"): "--lambda must be in [0, 1]",
        ("--fusion", "maxCE"): "unknown fusion function 'maxCE'",
        ("--k", "0"): "--k must be at least 1",
        ("--k", "5"): "--k must be in [1, 4] (the prepared k), got 5",
        ("--max-steps", "0"): "--max-steps must be at least 1",
        ("--target", f"bad={no_tokenizer}"): "tokenizer cannot load",
        ("--target", "nosuchmodel"): "unknown model 'nosuchmodel'",
    }
    for extra, message in cases.items():
        code, err = cli(capsys, "distill", "train", prepared, "--out", str(out), "--target", spec, *extra)
        assert code == 2 and message in err, (extra, code, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists()
    code, err = cli(capsys, "distill", "train", str(tmp_path), "--out", str(out))
    assert code == 2 and "manifest.json not found" in err and not out.exists()

    (tmp_path / "taken").mkdir()
    code, err = cli(capsys, "distill", "export", str(no_tokenizer), str(tmp_path / "taken"))
    assert code == 2 and "exists: pass --force" in err
    code, err = cli(capsys, "distill", "export", str(tmp_path / "prep"), str(tmp_path / "new"))
    assert code == 2 and "holds no model" in err and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-tokenizer", "prep", "taken"]


@pytest.mark.slow
def test_export_is_served_by_a_worker_as_transformers_generates(tmp_path, one_step):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coolfusion.distill.export import export
    from coolfusion.services.sources import parse_spec
    from coolfusion.services.worker.api import NextTextOptions
    from coolfusion.services.worker.model import WorkerCore

    run = one_step[0] / "run"
    dest = export(run, tmp_path / "distilled")
    assert json.loads((dest / "coolfusion-export.json").read_text())["run"]["lam"] == 0.3
    with pytest.raises(ValueError, match="exists"):
        export(run, dest)
    export(run / "model", dest, force=True, gguf="f32")  # replaces it whole, with a GGUF file
    assert [p.name for p in tmp_path.iterdir()] == ["distilled"]

    prompt = "Question: What is the capital of France?\nAnswer:"
    tokenizer = AutoTokenizer.from_pretrained(dest)
    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    trained = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    for a, b in zip(model.parameters(), trained.parameters(), strict=True):
        assert torch.equal(a, b)
    check_gguf(dest / "model-f32.gguf", trained)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    expected = tokenizer.decode(greedy, skip_special_tokens=True)

    # Served as `--models distilled=DIR` serves it: a worker core from that spec, greedy segments.
    core = WorkerCore("distilled", parse_spec(f"distilled={dest}"), device="cpu", backend="transformers")
    sid, _, _ = core.open(prompt)
    got: list[int] = []
    try:
        while len(got) < 12:
            r = core.next_text(sid, NextTextOptions([], 12 - len(got)))
            core.update_state(sid, r.state_id)
            got += r.token_ids
            if r.eos:
                break
    finally:
        core.close(sid)
    assert got == greedy.tolist()[: len(got)] and (len(got) == 12 or got[-1] in core.eos_token_ids)
    assert core.tokenizer.decode([t for t in got if t not in core.eos_token_ids])[0] == expected and expected.strip()


def check_gguf(path: Path, model) -> None:
    """Every tensor of the GGUF file, read back as transformers reads a Llama GGUF (its inverse of
    llama.cpp's rotary permutation), equals the trained weight; the metadata is the target's."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from coolfusion.services.sources import parse_spec

    config = model.config
    reader, original = gguf.GGUFReader(str(path)), gguf.GGUFReader(str(parse_spec("smollm2").gguf_path))
    assert reader.fields["tokenizer.ggml.tokens"].contents() == original.fields["tokenizer.ggml.tokens"].contents()
    assert reader.fields["llama.block_count"].contents() == config.num_hidden_layers
    assert sorted(t.name for t in reader.tensors) == sorted(t.name for t in original.tensors)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    hf = {names.get_name(k, try_suffixes=(".weight", ".bias")): v for k, v in model.state_dict().items()}
    heads = {"num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads}
    processor = LlamaTensorProcessor(config=heads)
    for tensor in reader.tensors:
        weights = processor.process(np.asarray(tensor.data), tensor.name).weights
        assert np.array_equal(weights, hf[tensor.name].numpy()), tensor.name
