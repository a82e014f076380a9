"""oneDNN-packed weights for multi-row forwards (services/worker/packing.py).

The oracle is the unpacked model: one row must be bitwise what ``nn.Linear`` gives (a decode step
stays the step ``generate`` takes), several rows the same product up to float rounding."""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

from coolfusion.services.worker.packing import PackedLinear, pack_linears, packing_supported


class TinyLM(nn.Module):
    """Two linears and an output layer tied to the embedding, like the bundled models."""

    def __init__(self, vocab: int = 300, width: int = 48):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width, bias=False)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        h = self.embed(ids)
        return self.lm_head(self.down(torch.relu(self.up(h))))


ONEDNN = packing_supported(TinyLM())
needs_onednn = pytest.mark.skipif(
    not ONEDNN,
    reason="this torch build has no oneDNN linear ops (torch.backends.mkldnn / torch.ops.mkldnn): workers run with "
    "plain weights here, and the packed path is not tested",
)


def test_onednn_is_there_where_torch_ships_it():
    """Every x86-64 CPU build of torch ships oneDNN: missing there, the install is broken and
    workers would silently run unpacked, so this fails instead of the tests below skipping."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"oneDNN packing is only required on x86-64 (this is {platform.machine()}); available: {ONEDNN}")
    assert ONEDNN, f"torch {torch.__version__} on x86-64 without oneDNN linear ops: a broken or unusual torch build"


@needs_onednn
@pytest.mark.parametrize("mode,expected", [("all", 3), ("head", 1), ("none", 0)])
def test_pack_modes_replace_the_right_linears(mode, expected):
    torch.manual_seed(0)
    model = TinyLM().eval()
    assert pack_linears(model, mode) == expected
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == expected
    assert pack_linears(model, mode) == 0  # idempotent: packed modules are not packed again
    if expected:
        assert model.lm_head.weight is model.embed.weight  # tied weights stay tied
        assert model.lm_head.packed.is_mkldnn  # the head's copy, in oneDNN's layout


@needs_onednn
def test_packed_rows_match_the_plain_product():
    torch.manual_seed(0)
    plain = TinyLM().eval()
    packed = TinyLM().eval()
    packed.load_state_dict(plain.state_dict())
    pack_linears(packed, "all")
    assert set(packed.state_dict()) == set(plain.state_dict())  # the packed copy is never saved
    with torch.inference_mode():
        for few in ([[7]], [[7, 8, 9]]):  # fewer than PACK_MIN_ROWS rows: the plain path, bitwise
            assert torch.equal(packed(torch.tensor(few)), plain(torch.tensor(few)))
        for shape in [(1, 5), (4, 1), (3, 6)]:
            ids = torch.randint(0, 300, shape)
            want, got = plain(ids), packed(ids)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            assert torch.equal(got.argmax(-1), want.argmax(-1))


@needs_onednn
def test_autograd_takes_the_plain_path():
    torch.manual_seed(0)
    model = TinyLM()
    pack_linears(model, "all")
    out = model(torch.randint(0, 300, (2, 3))).sum()
    out.backward()  # the oneDNN op has no gradient; training-mode calls must not reach it
    assert model.up.weight.grad is not None


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="pack mode"):
        pack_linears(TinyLM(), "some")


def test_non_float32_models_are_left_alone():
    model = TinyLM().to(torch.bfloat16)
    assert pack_linears(model, "all") == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
