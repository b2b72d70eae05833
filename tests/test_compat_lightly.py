"""ssl_ops.compat.lightly: lightly's names and argument orders, checked against
lightly's formulas (written out here) and, where lightly is installed, against
lightly itself; patch() round trips."""

import contextlib
import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssl_ops
from ssl_ops import emulation
from ssl_ops.compat import lightly as compat
from tolerances import assert_close, rtol


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def test_the_names_a_lightly_script_imports_are_there():
    for name in compat.__all__:
        assert hasattr(compat, name), name
    assert compat.NTXentLoss is ssl_ops.NTXentLoss
    assert compat.MemoryBankModule is ssl_ops.MemoryBank


def test_importing_compat_does_not_import_lightly():
    code = "import sys, ssl_ops.compat.lightly, ssl_ops.compat.solo_learn; print('lightly' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_update_momentum_is_lightlys_formula_on_parameters_only():
    online = small_model(0)
    ema = small_model(1)
    online(torch.randn(8, 6))  # moves online's BN statistics; ema's must stay
    ema_params = [p.detach().clone() for p in ema.parameters()]
    ema_buffers = [b.clone() for b in ema.buffers()]
    m = 0.9
    compat.update_momentum(online, ema, m)  # lightly's order: (model, model_ema, m)
    for after, before, o in zip(ema.parameters(), ema_params, online.parameters()):
        # lightly: _foreach_mul_(ema, m); _foreach_add_(ema, online, alpha=1 - m)
        expected = before * m + o.detach() * (1 - m)
        torch.testing.assert_close(after.detach(), expected, rtol=2e-7, atol=1e-7)
    assert all(torch.equal(a, b) for a, b in zip(ema.buffers(), ema_buffers))


def test_update_momentum_matches_lightly():
    utils = pytest.importorskip("lightly.models.utils")
    online, ema = small_model(0), small_model(1)
    theirs = copy.deepcopy(ema)
    for step in range(3):
        m = 0.99 - 0.1 * step
        compat.update_momentum(online, ema, m)
        utils.update_momentum(online, theirs, m)
        for a, b in zip(ema.state_dict().values(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=2e-7, atol=1e-7)


def test_requires_grad_switches():
    model = small_model()
    compat.deactivate_requires_grad(model)
    assert not any(p.requires_grad for p in model.parameters())
    compat.activate_requires_grad(model)
    assert all(p.requires_grad for p in model.parameters())


def test_cosine_schedule_is_lightlys_formula():
    def lightly_formula(step, max_steps, start, end, period=None):
        if period is not None:
            return end - (end - start) * (math.cos(2 * math.pi * step / period) + 1) / 2
        if max_steps <= 1 or step >= max_steps - 1:
            return end
        return end - (end - start) * (math.cos(math.pi * step / (max_steps - 1)) + 1) / 2

    for step, max_steps, start, end, period in [(1, 10, 1.0, 0.0, None), (2, 10, 1.0, 0.0, None),
                                                 (0, 100, 0.996, 1.0, None), (99, 100, 0.996, 1.0, None),
                                                 (150, 100, 0.5, 1.0, None), (7, 1, 0.5, 1.0, None),
                                                 (3, 10, 1.0, 0.0, 4)]:
        past_the_end = period is None and step > max_steps
        with pytest.warns(RuntimeWarning, match="exceeds max_steps") if past_the_end else contextlib.nullcontext():
            value = compat.cosine_schedule(step, max_steps, start, end, period)  # lightly warns there too
        assert value == pytest.approx(lightly_formula(step, max_steps, start, end, period), abs=1e-12)
    assert compat.cosine_schedule(1, 10, 1.0, 0.0) == pytest.approx(0.96984631, abs=1e-8)
    for bad in [(-1, 10, 1.0, 0.0), (1, -1, 1.0, 0.0)]:
        with pytest.raises(ValueError):
            compat.cosine_schedule(*bad)
    with pytest.raises(ValueError):
        compat.cosine_schedule(1, 10, 1.0, 0.0, period=0)


def lightly_ntxent_formula(out0, out1, temperature):
    z = F.normalize(torch.cat([out0, out1]), dim=1)
    n = out0.shape[0]
    logits = (z @ z.t() / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(logits, torch.arange(2 * n).roll(n))


@pytest.mark.parametrize("emulated", [False, True], ids=["cpu", "emulated-cuda"])
def test_ntxent_and_negative_cosine_against_lightlys_formulas(emulated):
    if emulated and not emulation.available():
        pytest.skip("the emulation module is not built")
    g = torch.Generator().manual_seed(0)
    out0, out1 = (torch.randn(9, 7, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    context = emulation.use_emulated_kernels() if emulated else torch.enable_grad()
    with context:
        ours = compat.NTXentLoss(temperature=0.2)(out0, out1)
        g_ours = torch.autograd.grad(ours, [out0, out1])
        cos = compat.NegativeCosineSimilarity()(out0, out1)
        g_cos = torch.autograd.grad(cos, [out0, out1])
    theirs = lightly_ntxent_formula(out0, out1, 0.2)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_ours, torch.autograd.grad(theirs, [out0, out1])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    cos_theirs = -F.cosine_similarity(out0, out1, dim=1, eps=1e-8).mean()
    torch.testing.assert_close(cos, cos_theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_cos, torch.autograd.grad(cos_theirs, [out0, out1])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_memory_bank_module_is_lightlys_ring_buffer():
    bank = compat.MemoryBankModule(size=(5, 3))
    assert torch.allclose(bank.bank.norm(dim=1), torch.ones(5))
    batch = torch.randn(2, 3)
    out, snapshot = bank(batch, update=True)
    assert out is batch and snapshot.shape == (3, 5)  # feature_dim_first: (D, K)
    assert torch.equal(bank.bank[:2], batch)
    bank(torch.randn(4, 3), update=True)  # 2 + 4 >= 5: fills to the end, drops the rest, wraps
    assert int(bank.bank_ptr) == 0


def patched_objects():
    import lightly.loss
    import lightly.loss.negative_cosine_similarity
    import lightly.loss.ntx_ent_loss
    import lightly.models.utils

    return {
        (module.__name__, name): module.__dict__.get(name)
        for module, names in [
            (lightly.loss, ["NTXentLoss", "NegativeCosineSimilarity"]),
            (lightly.loss.ntx_ent_loss, ["NTXentLoss"]),
            (lightly.loss.negative_cosine_similarity, ["NegativeCosineSimilarity"]),
            (lightly.models.utils, ["update_momentum", "deactivate_requires_grad", "activate_requires_grad"]),
        ]
        for name in names
    }


def test_patch_round_trip_leaves_lightly_as_it_was():
    pytest.importorskip("lightly.loss")
    before = patched_objects()
    handle = compat.patch()
    import lightly.loss
    import lightly.models.utils

    assert lightly.loss.NTXentLoss is compat.NTXentLoss
    assert lightly.models.utils.update_momentum is compat.update_momentum
    assert handle.active
    # A lightly-style script running on the patched names.
    online, ema = small_model(0), small_model(1)
    lightly.models.utils.update_momentum(online, ema, 0.5)
    loss = lightly.loss.NTXentLoss(temperature=0.3)(torch.randn(4, 5), torch.randn(4, 5))
    assert torch.isfinite(loss)
    handle.undo()
    handle.undo()  # a second undo does nothing
    after = patched_objects()
    assert all(after[key] is before[key] for key in before)
    with compat.patch():
        assert lightly.loss.NegativeCosineSimilarity is compat.NegativeCosineSimilarity
    assert all(patched_objects()[key] is before[key] for key in before)


def test_patch_without_lightly_says_so(monkeypatch):
    # import lightly.* now fails, as without lightly installed (None in sys.modules)
    for name in ["lightly", *[m for m in sys.modules if m.startswith("lightly.")]]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"needs lightly installed \(pip install lightly\)"):
        compat.patch()


def _moco_pair(L):
    """lightly's NTXentLoss with a memory bank (MoCo) and ours, the banks equal."""
    ours, theirs = compat.NTXentLoss(0.1, memory_bank_size=(64, 32)), L.NTXentLoss(0.1, memory_bank_size=(64, 32))
    theirs.memory_bank.bank.copy_(ours.memory_bank.bank)
    return ours, theirs.double()


@pytest.mark.emu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "make_pair, rows, features",
    [
        (lambda L: (compat.NTXentLoss(0.1), L.NTXentLoss(0.1)), 9, 32),
        (lambda L: (compat.NTXentLoss(0.5), L.NTXentLoss(0.5)), 40, 128),
        (lambda L: (compat.NTXentLoss(0.2), L.NTXentLoss(0.2)), 66, 256),
        (_moco_pair, 9, 32),
        (lambda L: (compat.DCLLoss(0.1), L.DCLLoss(0.1)), 9, 16),
        (lambda L: (compat.DCLWLoss(0.2, sigma=0.5), L.DCLWLoss(0.2, sigma=0.5)), 33, 64),
    ],
    ids=["ntxent-9x32", "ntxent-40x128", "ntxent-66x256", "ntxent-memory-bank-9x32", "dcl-9x16", "dclw-33x64"],
)
def test_lightly_losses_on_the_fused_route_match_lightly(dtype, make_pair, rows, features):
    """Half rows take the fused route under the emulator (no vendor GEMM, the
    mma count grows); lightly's own loss on the same rows in float64 is the
    oracle, loss and gradients."""
    lightly_loss = pytest.importorskip("lightly.loss")
    if not emulation.available():
        pytest.skip("the emulation module is not built")
    from test_fused_route import fused_kernel_runs

    ours_loss, theirs_loss = make_pair(lightly_loss)
    g = torch.Generator().manual_seed(rows)
    out0, out1 = (torch.randn(rows, features, generator=g).to(dtype).requires_grad_() for _ in range(2))
    with emulation.use_emulated_kernels(), fused_kernel_runs():
        ours = ours_loss(out0, out1)
        grads = torch.autograd.grad(ours, [out0, out1])
    ref0, ref1 = (x.detach().double().requires_grad_() for x in (out0, out1))
    theirs = theirs_loss(ref0, ref1)
    ref_grads = torch.autograd.grad(theirs, [ref0, ref1])
    bank_rows = ours_loss.memory_bank.size[0] if hasattr(ours_loss, "memory_bank") else 0
    length = 2 * rows + bank_rows + features  # the longest sums: candidates, features
    scale = 1 / ours_loss.temperature
    assert_close(ours, theirs, rtol(dtype, output=ours.dtype, length=length, logit_scale=scale), "loss")
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert a.dtype == dtype
        assert_close(a, b, rtol(dtype, length=length, logit_scale=scale), f"d out{i}")
