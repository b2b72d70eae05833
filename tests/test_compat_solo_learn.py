"""ssl_ops.compat.solo_learn against solo-learn's formulas (main branch, written
out here: its release on the package index is an older API), for values and
gradients, on the CPU kernels and the emulated CUDA route."""


import pytest
import torch
import torch.nn.functional as F

from ssl_ops.compat import solo_learn as solo
from routes import route

ROUTES = ["cpu", "emulated"]  # fp32: the default CUDA route is the GEMM route


def randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


def check(ours_fn, theirs_fn, inputs, rtol=1e-10):
    ours = ours_fn(*inputs)
    theirs = theirs_fn(*inputs)
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=1e-12)
    differentiable = [t for t in inputs if t.requires_grad]
    for a, b in zip(torch.autograd.grad(ours, differentiable), torch.autograd.grad(theirs, differentiable)):
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=1e-12)


def solo_simclr(z, indexes, temperature=0.1):
    z = F.normalize(z, dim=-1)
    sim = torch.exp(z @ z.t() / temperature)
    pos_mask = indexes[:, None] == indexes[None, :]
    pos_mask.fill_diagonal_(False)
    neg_mask = indexes[:, None] != indexes[None, :]
    pos = (sim * pos_mask).sum(1)
    neg = (sim * neg_mask).sum(1)
    return -torch.log(pos / (pos + neg)).mean()


@pytest.mark.parametrize("route_name", ROUTES)
def test_simclr_two_crops(route_name, monkeypatch):
    indexes = torch.tensor([4, 1, 7, 2, 9] * 2)[torch.randperm(10, generator=torch.Generator().manual_seed(1))]
    with route(route_name, monkeypatch):
        check(lambda z: solo.simclr_loss_func(z, indexes), lambda z: solo_simclr(z, indexes), [randn(10, 6)])
        check(lambda z: solo.simclr_loss_func(z, indexes, temperature=0.5),
              lambda z: solo_simclr(z, indexes, 0.5), [randn(10, 6, seed=2)])


@pytest.mark.parametrize("route_name", ROUTES)
@pytest.mark.parametrize("crops", [3, 4, "mixed"])
def test_simclr_multi_crop(route_name, crops, monkeypatch):
    """More than two crops per index: solo puts the positives inside the log,
    which the default (mean) form of nt_xent_loss would not match."""
    if crops == "mixed":  # 2, 3 and 5 crops per index in one batch
        indexes = torch.tensor([0] * 2 + [1] * 3 + [2] * 5 + [3] * 3 + [4] * 2)
    else:
        indexes = torch.arange(24 if crops == 4 else 7).repeat(crops)
    indexes = indexes[torch.randperm(len(indexes), generator=torch.Generator().manual_seed(3))]
    with route(route_name, monkeypatch):
        check(lambda z: solo.simclr_loss_func(z, indexes), lambda z: solo_simclr(z, indexes),
              [randn(len(indexes), 8, seed=4)])
        check(lambda z: solo.simclr_loss_func(z, indexes, temperature=0.5),
              lambda z: solo_simclr(z, indexes, 0.5), [randn(len(indexes), 8, seed=5)])


def test_simclr_errors():
    with pytest.raises(ValueError, match=r"at least two crops.*indexes \[2\] appear once"):
        solo.simclr_loss_func(randn(7, 4), torch.tensor([0, 0, 0, 1, 1, 1, 2]))
    with pytest.raises(ValueError, match="one entry per row of z"):
        solo.simclr_loss_func(randn(6, 4), torch.tensor([0, 1, 2]))


def solo_mocov2plus(query, key, queue, temperature=0.1):
    pos = torch.einsum("nc,nc->n", [query, key]).unsqueeze(-1)
    neg = torch.einsum("nc,ck->nk", [query, queue])
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(query.size(0), dtype=torch.long))


@pytest.mark.parametrize("route_name", ROUTES)
def test_mocov2plus(route_name, monkeypatch):
    # solo normalises before the call; the queue is (D, K).
    query = F.normalize(randn(8, 5), dim=1).detach().requires_grad_()
    key = F.normalize(randn(8, 5, seed=1), dim=1).detach()
    queue = F.normalize(randn(5, 300, seed=2), dim=0).detach()
    with route(route_name, monkeypatch):
        check(solo.mocov2plus_loss_func, solo_mocov2plus, [query, key, queue])
        check(lambda q, k, Q: solo.mocov2plus_loss_func(q, k, Q, temperature=0.2),
              lambda q, k, Q: solo_mocov2plus(q, k, Q, 0.2), [query, key, queue])


def copies_of(shape_options, fn):
    """The aten copies (clone, contiguous, copy_, _to_copy) that fn makes of a
    tensor of one of the given shapes, as the profiler records them (including
    those made inside ssl_ops' C++ operators)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    names = {"aten::clone", "aten::contiguous", "aten::copy_", "aten::_to_copy"}
    return [e.name for e in prof.events()
            if e.name in names and any(list(s) in shape_options for s in e.input_shapes)]


@pytest.mark.parametrize("route_name", ["cpu", "emulated-gemm"])
def test_mocov2plus_never_copies_the_queue(route_name, monkeypatch):
    d, k = 16, 4099
    query = F.normalize(randn(8, d), dim=1).detach().requires_grad_()
    key = F.normalize(randn(8, d, seed=1), dim=1).detach()
    queue = F.normalize(randn(d, k, seed=2), dim=0).detach()
    with route(route_name, monkeypatch):
        def step():
            torch.autograd.grad(solo.mocov2plus_loss_func(query, key, queue), [query])

        assert copies_of([[k, d], [d, k]], step) == []
        # The detector sees a copy where there is one: normalising the queue in the kernel.
        from ssl_ops import info_nce_loss

        assert copies_of([[k, d], [d, k]], lambda: info_nce_loss(query, key, queue.t())) != []


def solo_mocov3(query, key, temperature=0.2):
    query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
    logits = query @ key.t() / temperature
    return F.cross_entropy(logits, torch.arange(query.size(0))) * (2 * temperature)


@pytest.mark.parametrize("route_name", ROUTES)
def test_mocov3(route_name, monkeypatch):
    with route(route_name, monkeypatch):
        check(solo.mocov3_loss_func, solo_mocov3, [randn(9, 7), randn(9, 7, seed=1)])
        check(lambda q, k: solo.mocov3_loss_func(q, k, 0.5), lambda q, k: solo_mocov3(q, k, 0.5),
              [randn(9, 7, seed=3), randn(9, 7, seed=4)])


def solo_byol(p, z, simplified=True):
    if simplified:
        return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1).mean()
    p, z = F.normalize(p, dim=-1), F.normalize(z, dim=-1)
    return 2 - 2 * (p * z.detach()).sum(dim=1).mean()


@pytest.mark.parametrize("route_name", ["cpu", "emulated-gemm"])
@pytest.mark.parametrize("simplified", [True, False])
def test_byol(route_name, simplified, monkeypatch):
    p, z = randn(11, 6), randn(11, 6, seed=1)
    with route(route_name, monkeypatch):
        check(lambda p, z: solo.byol_loss_func(p, z, simplified), lambda p, z: solo_byol(p, z, simplified),
              [p, z.detach()])
        # The target takes no gradient.
        loss = solo.byol_loss_func(p, z, simplified)
        assert torch.autograd.grad(loss, [z], allow_unused=True)[0] is None
