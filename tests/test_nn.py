"""The nn.Module losses against lightly itself as the oracle (lightly 1.6)."""

import pytest
import torch
import torch.nn.functional as F

import ssl_ops

lightly_loss = pytest.importorskip("lightly.loss")


def views(b, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g).requires_grad_(), torch.randn(b, d, generator=g).requires_grad_())


@pytest.mark.parametrize("temperature", [0.5, 0.1, -0.2])
def test_ntxent_without_bank(temperature):
    out0, out1 = views(12, 16, 0)
    ours = ssl_ops.NTXentLoss(temperature)(out0, out1)
    theirs = lightly_loss.NTXentLoss(temperature)(out0, out1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, [out0, out1]), torch.autograd.grad(theirs, [out0, out1])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_ntxent_with_memory_bank_matches_lightly_step_by_step():
    torch.manual_seed(5)
    ours = ssl_ops.NTXentLoss(0.2, memory_bank_size=(10, 16))
    torch.manual_seed(5)
    theirs = lightly_loss.NTXentLoss(0.2, memory_bank_size=(10, 16))
    torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank)
    for step in range(5):  # batches of 4 into 10 rows: wraps around, dropping the rest
        out0, out1 = views(4, 16, step)
        a, b = ours(out0, out1), theirs(out0, out1)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for ga, gb in zip(torch.autograd.grad(a, [out0, out1]), torch.autograd.grad(b, [out0, out1])):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank, rtol=1e-6, atol=1e-7)
        assert int(ours.memory_bank.bank_ptr) == int(theirs.memory_bank.bank_ptr)
    frozen = ours.memory_bank.bank.clone()
    ours(out0.detach(), out1.detach())  # no gradient: the bank is left alone
    assert torch.equal(frozen, ours.memory_bank.bank)


def test_memory_bank_shapes_and_errors():
    bank = ssl_ops.MemoryBank((8, 3), feature_dim_first=False)
    out, snapshot = bank(torch.randn(2, 3), update=True)
    assert snapshot.shape == (8, 3)
    assert ssl_ops.MemoryBank((8, 3))(torch.randn(2, 3))[1].shape == (3, 8)
    assert ssl_ops.MemoryBank(0)(torch.randn(2, 3))[1] is None
    with pytest.raises(ValueError, match=r"does not specify the feature dimension"):
        ssl_ops.MemoryBank(5)
    with pytest.raises(ValueError, match="all entries must be non-negative"):
        ssl_ops.MemoryBank((-1, 3))
    with pytest.raises(ValueError, match=r"Illegal temperature: abs\(0.0\) < 1e-8"):
        ssl_ops.NTXentLoss(0.0)


def test_cosine_modules_match_lightly():
    x0, x1 = views(9, 7, 1)
    ours = ssl_ops.NegativeCosineSimilarity()(x0, x1)
    theirs = lightly_loss.NegativeCosineSimilarity()(x0, x1)
    torch.testing.assert_close(ours, theirs)
    byol = ssl_ops.BYOLLoss()(x0, x1.detach())
    torch.testing.assert_close(byol, 2 + 2 * theirs.detach(), rtol=1e-6, atol=1e-6)
    info = ssl_ops.InfoNCELoss(0.1)(x0, x1)
    # MoCo v3's formula (solo-learn's mocov3_loss_func without its 2T factor), in float64.
    logits = F.normalize(x0.detach().double(), dim=1) @ F.normalize(x1.detach().double(), dim=1).t() / 0.1
    torch.testing.assert_close(info.double(), F.cross_entropy(logits, torch.arange(9)), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("SimCLRProjectionHead", dict(input_dim=12, hidden_dim=10, output_dim=6)),
        ("SimCLRProjectionHead", dict(input_dim=12, hidden_dim=10, output_dim=6, num_layers=3, batch_norm=False)),
        ("MoCoProjectionHead", dict(input_dim=12, hidden_dim=10, output_dim=6)),
        ("MoCoProjectionHead", dict(input_dim=12, hidden_dim=10, output_dim=6, num_layers=3, batch_norm=True)),
        ("BYOLProjectionHead", dict(input_dim=12, hidden_dim=10, output_dim=6)),
        ("BYOLPredictionHead", dict(input_dim=6, hidden_dim=10, output_dim=6)),
    ],
)
def test_heads_match_lightly_layers_and_outputs(name, kwargs):
    heads = pytest.importorskip("lightly.models.modules.heads")
    theirs = getattr(heads, name)(**kwargs)
    ours = getattr(ssl_ops, name)(**kwargs)
    assert [type(m) for m in ours.layers] == [type(m) for m in theirs.layers]
    ours.load_state_dict(theirs.state_dict())  # same names and shapes
    x = torch.randn(5, kwargs["input_dim"])
    torch.testing.assert_close(ours(x), theirs(x))


def test_head_needs_two_layers():
    with pytest.raises(ValueError, match="num_layers must be at least 2, got 1"):
        ssl_ops.SimCLRProjectionHead(num_layers=1)


def test_projection_head_takes_lightly_blocks_with_use_bias():
    heads = pytest.importorskip("lightly.models.modules.heads")
    blocks = lambda: [  # noqa: E731
        (12, 10, torch.nn.BatchNorm1d(10), torch.nn.ReLU(), True),  # bias despite batch norm
        (10, 8, None, torch.nn.GELU(), False),                      # no bias, no batch norm
        (8, 6, None, None),                                         # lightly's 4-element form
    ]
    theirs, ours = heads.ProjectionHead(blocks()), ssl_ops.ProjectionHead(blocks())
    assert [type(m) for m in ours.layers] == [type(m) for m in theirs.layers]
    assert [getattr(m, "bias", None) is None for m in ours.layers] == [
        getattr(m, "bias", None) is None for m in theirs.layers
    ]
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), theirs(x))
    with pytest.raises(ValueError, match="each block must be"):
        ssl_ops.ProjectionHead([(3, 4, None)])
