"""gather_distributed across 2 CPU processes over gloo: every rank's loss and
gradients against one process on the whole batch and solo-learn's MoCo v3
formula, ssl_ops.compat.solo_learn against solo's formulas with its GatherLayer,
and the memory bank's gather-before-enqueue; in a second test (skipped
without lightly), against lightly's distributed NTXentLoss and memory bank."""

import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.multiprocessing as mp

import ssl_ops

WORLD = 2
BATCH, DIM = 6, 5  # per rank


def whole_batch(seed=0):
    """Both views of the whole batch; rank r owns rows [r * BATCH, (r + 1) * BATCH)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(WORLD * BATCH, DIM, generator=g), torch.randn(WORLD * BATCH, DIM, generator=g)


def shard(t, rank):
    return t[rank * BATCH : (rank + 1) * BATCH].clone().requires_grad_()


def assert_ddp_update_is_one_process(rank, loss, full_loss, pairs):
    """DDP averages the ranks' gradients: the mean of the ranks' losses and each
    rank's gradient / WORLD equal one process's on the whole batch."""
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total / WORLD, full_loss.detach(), rtol=1e-5, atol=1e-6)
    for local, full in pairs:
        torch.testing.assert_close(local.grad / WORLD, shard(full.grad, rank).detach(), rtol=1e-5, atol=1e-7)


def check_nt_xent(rank):
    """The update of DDP (mean of the ranks' gradients) equals one process's."""
    out0, out1 = whole_batch()
    full0, full1 = out0.clone().requires_grad_(), out1.clone().requires_grad_()
    full_loss = ssl_ops.nt_xent_loss(full0, full1, 0.3)
    full_loss.backward()

    a, b = shard(out0, rank), shard(out1, rank)
    loss = ssl_ops.nn.NTXentLoss(temperature=0.3, gather_distributed=True)(a, b)
    loss.backward()
    assert_ddp_update_is_one_process(rank, loss, full_loss, [(a, full0), (b, full1)])


def check_siglip(rank):
    """SigLIP with gathered texts: DDP's averaged update (features, scale and
    bias) equals one process's on the whole batch."""
    out0, out1 = whole_batch(seed=6)
    full0, full1 = out0.clone().requires_grad_(), out1.clone().requires_grad_()
    full_scale, full_bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    full_loss = ssl_ops.siglip_loss(full0, full1, full_scale, full_bias)
    full_loss.backward()

    a, b = shard(out0, rank), shard(out1, rank)
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    loss = ssl_ops.SigLipLoss(gather_distributed=True)(a, b, scale, bias)
    loss.backward()
    assert_ddp_update_is_one_process(rank, loss, full_loss, [(a, full0), (b, full1)])
    for local, full in ((scale, full_scale), (bias, full_bias)):
        averaged = local.grad.clone()
        dist.all_reduce(averaged)
        torch.testing.assert_close(averaged / WORLD, full.grad, rtol=1e-5, atol=1e-7)


def check_nt_xent_lightly(rank):
    """lightly's own distributed loss, the drop-in oracle: this rank's value and gradients."""
    from lightly.loss import NTXentLoss as LightlyNTXent

    out0, out1 = whole_batch()
    a, b = shard(out0, rank), shard(out1, rank)
    loss = ssl_ops.nn.NTXentLoss(temperature=0.3, gather_distributed=True)(a, b)
    loss.backward()
    la, lb = shard(out0, rank), shard(out1, rank)
    expected = LightlyNTXent(temperature=0.3, gather_distributed=True)(la, lb)
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, la.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.grad, lb.grad, rtol=1e-5, atol=1e-7)


def check_dcl_lightly(rank):
    """lightly's DCLLoss and DCLWLoss with gather_distributed: negatives from every rank."""
    import warnings

    from lightly.loss import DCLLoss as LightlyDCL, DCLWLoss as LightlyDCLW

    out0, out1 = whole_batch(seed=5)
    for ours_cls, theirs_cls in ((ssl_ops.DCLLoss, LightlyDCL), (ssl_ops.DCLWLoss, LightlyDCLW)):
        a, b = shard(out0, rank), shard(out1, rank)
        loss = ours_cls(temperature=0.2, gather_distributed=True)(a, b)
        loss.backward()
        la, lb = shard(out0, rank), shard(out1, rank)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lightly's torch.tensor(tensor) in its DCLW weights
            expected = theirs_cls(temperature=0.2, gather_distributed=True)(la, lb)
        expected.backward()
        torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.grad, la.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b.grad, lb.grad, rtol=1e-5, atol=1e-7)


def check_multi_positive(rank):
    """Several views and SupCon labels: labels are compared across ranks."""
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64) for _ in range(3)]
    full = [v.clone().requires_grad_() for v in views]
    ssl_ops.nt_xent_loss(full, temperature=0.5).backward()
    mine = [shard(v, rank) for v in views]
    loss = ssl_ops.nt_xent_loss(mine, temperature=0.5, gather_distributed=True)
    loss.backward()
    for m, f in zip(mine, full):
        torch.testing.assert_close(m.grad / WORLD, shard(f.grad, rank).detach())

    z = torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (WORLD * BATCH,), generator=g)
    zf = z.clone().requires_grad_()
    full_rows = ssl_ops.nt_xent_loss(zf, labels=labels, temperature=0.2, reduction="none")
    full_rows.sum().backward()
    zr = shard(z, rank)
    rows = ssl_ops.nt_xent_loss(
        zr, labels=labels[rank * BATCH : (rank + 1) * BATCH], temperature=0.2, reduction="none", gather_distributed=True
    )
    torch.testing.assert_close(rows.detach(), shard(full_rows, rank).detach())
    rows.sum().backward()  # sum over ranks of the row losses: the full sum
    torch.testing.assert_close(zr.grad, shard(zf.grad, rank).detach())


def check_info_nce(rank):
    """MoCo v3 (keys without gradient; solo-learn's labels arange(B) + B * rank)
    and CLIP (symmetric, both sides with gradient) against one process."""
    query_all, key_all = whole_batch(seed=3)
    q = shard(query_all, rank)
    k = key_all[rank * BATCH : (rank + 1) * BATCH]
    loss = ssl_ops.InfoNCELoss(temperature=0.2, gather_distributed=True)(q, k)
    loss.backward()
    # solo-learn's mocov3_loss_func on this rank, without its 2 * temperature factor.
    logits = F.normalize(q.detach(), dim=1) @ F.normalize(key_all, dim=1).t() / 0.2
    expected = F.cross_entropy(logits, torch.arange(BATCH) + BATCH * rank)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    full_q = query_all.clone().requires_grad_()
    ssl_ops.info_nce_loss(full_q, key_all, temperature=0.2).backward()
    torch.testing.assert_close(q.grad / WORLD, shard(full_q.grad, rank).detach(), rtol=1e-5, atol=1e-7)

    qa, ka = shard(query_all, rank), shard(key_all, rank)
    clip = ssl_ops.info_nce_loss(qa, ka, temperature=0.1, symmetric=True, gather_distributed=True)
    clip.backward()
    fq, fk = query_all.clone().requires_grad_(), key_all.clone().requires_grad_()
    full = ssl_ops.info_nce_loss(fq, fk, temperature=0.1, symmetric=True)
    full.backward()
    assert_ddp_update_is_one_process(rank, clip, full, [(qa, fq), (ka, fk)])


class _SoloGatherLayer(torch.autograd.Function):
    """solo-learn's GatherLayer (solo/utils/misc.py), written out: all_gather
    forward; the backward keeps this rank's slice of the gradient, unsummed."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        return grads[dist.get_rank()].clone()


def check_solo_compat(rank):
    """ssl_ops.compat.solo_learn's simclr_loss_func and mocov3_loss_func across
    ranks against solo-learn's own formulas (main branch), values and gradients."""
    from ssl_ops.compat import solo_learn

    for crops in (2, 3):  # three crops: the positives inside the log
        g = torch.Generator().manual_seed(7)
        z_all = torch.randn(WORLD * crops * BATCH, DIM, generator=g, dtype=torch.float64)
        idx_all = torch.arange(WORLD * BATCH).repeat_interleave(crops)  # the crops of each sample, side by side
        rows = slice(rank * crops * BATCH, (rank + 1) * crops * BATCH)
        z = z_all[rows].clone().requires_grad_()
        loss = solo_learn.simclr_loss_func(z, idx_all[rows], temperature=0.2)
        loss.backward()
        zs = z_all[rows].clone().requires_grad_()
        zn = F.normalize(zs, dim=-1)
        gathered = torch.cat(_SoloGatherLayer.apply(zn))
        sim = torch.exp(zn @ gathered.t() / 0.2)
        pos_mask = idx_all[rows][:, None] == idx_all[None, :]
        pos_mask[:, zs.size(0) * rank :].fill_diagonal_(False)
        neg_mask = idx_all[rows][:, None] != idx_all[None, :]
        pos, neg = (sim * pos_mask).sum(1), (sim * neg_mask).sum(1)
        expected = -torch.log(pos / (pos + neg)).mean()
        expected.backward()
        torch.testing.assert_close(loss.detach(), expected.detach())
        torch.testing.assert_close(z.grad, zs.grad)

    query_all, key_all = whole_batch(seed=4)
    q = shard(query_all, rank).double().detach().requires_grad_()
    k = key_all[rank * BATCH : (rank + 1) * BATCH].double()
    loss = solo_learn.mocov3_loss_func(q, k, temperature=0.3)
    loss.backward()
    qs = q.detach().clone().requires_grad_()
    logits = F.normalize(qs, dim=1) @ F.normalize(key_all.double(), dim=1).t() / 0.3
    expected = F.cross_entropy(logits, torch.arange(BATCH) + BATCH * rank) * (2 * 0.3)
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach())
    torch.testing.assert_close(q.grad, qs.grad)


def check_bank_order(rank):
    """Every rank's batch lands in the bank, in rank order."""
    bank = ssl_ops.nn.MemoryBank(size=(8, DIM), gather_distributed=True, feature_dim_first=False)
    rows = torch.full((2, DIM), float(rank))
    bank(rows, update=True)
    expected_rows = torch.cat([torch.full((2, DIM), float(r)) for r in range(WORLD)])
    torch.testing.assert_close(bank.bank[: 2 * WORLD], expected_rows)
    assert int(bank.bank_ptr) == 2 * WORLD


def check_memory_bank_lightly(rank):
    """Loss, gradients and bank against lightly's, through a wrap-around."""
    from lightly.loss import NTXentLoss as LightlyNTXent

    torch.manual_seed(5)  # the same initial bank on every rank, for both modules
    ours = ssl_ops.nn.NTXentLoss(temperature=0.2, memory_bank_size=(16, DIM), gather_distributed=True)
    torch.manual_seed(5)
    theirs = LightlyNTXent(temperature=0.2, memory_bank_size=(16, DIM), gather_distributed=True)
    torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank)
    for step in range(3):  # 3 x 12 rows through a 16-row bank: wraps around
        out0, out1 = whole_batch(seed=10 + step)
        a, b = shard(out0, rank), shard(out1, rank)
        la, lb = shard(out0, rank), shard(out1, rank)
        loss, expected = ours(a, b), theirs(la, lb)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        loss.backward()
        expected.backward()
        torch.testing.assert_close(a.grad, la.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours.memory_bank.bank, theirs.memory_bank.bank)
        assert int(ours.memory_bank.bank_ptr) == int(theirs.memory_bank.bank_ptr)




def check_clip_open_clip(rank):
    """ssl_ops.ClipLoss against open_clip's ClipLoss on the same shards, in all
    four modes (global or local_loss, gather with or without grad): loss and
    the gradients of both features and the scale, on every rank."""
    from open_clip.loss import ClipLoss

    out0, out1 = whole_batch(seed=9)
    for local_loss in (False, True):
        for gather_with_grad in (False, True):
            kwargs = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=WORLD)
            results = []
            for module in (ssl_ops.ClipLoss(**kwargs), ClipLoss(**kwargs)):
                a, b = shard(out0, rank), shard(out1, rank)
                scale = torch.tensor(14.0, requires_grad=True)
                loss = module(F.normalize(a, dim=1), F.normalize(b, dim=1), scale)
                loss.backward()
                results.append((loss.detach(), a.grad, b.grad, scale.grad))
            for ours, theirs in zip(*results):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=lambda m: f"{kwargs}: {m}")


SUITES = {
    "one_process": (check_nt_xent, check_multi_positive, check_info_nce, check_bank_order, check_solo_compat,
                    check_siglip),
    "lightly": (check_nt_xent_lightly, check_memory_bank_lightly, check_dcl_lightly),
    "open_clip": (check_clip_open_clip,),
}


def _worker(rank, store_path, suite):
    if suite in ("lightly", "open_clip"):  # (open_clip.loss imports torch.distributed.nn too)
        # Before init_process_group: lightly.loss imports torch.distributed.nn
        # (also via torch._dynamo), whose functions take `group=group.WORLD` as
        # default arguments, evaluated at import. Imported after init, they hold
        # the default group past destroy_process_group, so its gloo threads
        # (pt_gloo_runloop) outlive it; one that drops its last Work (Python
        # tensors) after the main thread entered Py_FinalizeEx takes the GIL,
        # is made to pthread_exit, and the forced unwind through the noexcept
        # ~AsyncWork calls std::terminate: "terminate called without an active
        # exception", SIGABRT, in about 1 run in 20. Imported before init, the
        # defaults are None. The weakref check below catches any such holder.
        __import__(f"{suite}.loss")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback, whatever the host name resolves to
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    group = weakref.ref(dist.group.WORLD)
    try:
        for check in SUITES[suite]:
            check(rank)
    finally:
        dist.destroy_process_group()
    # Destroyed means freed: ~ProcessGroupGloo joins its threads before exit.
    assert group() is None, "the default process group outlived destroy_process_group (see above)"


needs_dist = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


@needs_dist
def test_two_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), "one_process"), nprocs=WORLD, join=True)


@needs_dist
def test_two_processes_match_lightly(tmp_path):
    pytest.importorskip("lightly.loss")
    mp.spawn(_worker, args=(str(tmp_path / "store"), "lightly"), nprocs=WORLD, join=True)


@needs_dist
def test_two_processes_match_open_clip(tmp_path):
    pytest.importorskip("open_clip.loss")
    mp.spawn(_worker, args=(str(tmp_path / "store"), "open_clip"), nprocs=WORLD, join=True)
