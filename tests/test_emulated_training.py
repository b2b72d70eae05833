"""ssl_ops.emulation.use_emulated_kernels(): the public API on CPU tensors runs
the CUDA code path through the emulator. Whole training steps against the CPU
kernels, and the share of the eager loss's matrix-multiply FLOPs that the GEMM
route puts in vendor GEMM calls (ATen's, counted by torch.profiler)."""

import contextlib
import copy

import pytest
import torch

import ssl_ops
from ssl_ops import emulation, reference

pytestmark = pytest.mark.emu


@pytest.fixture(autouse=True)
def _needs_emulator(monkeypatch):
    if not emulation.available():
        pytest.skip("emulation module not built (SSL_OPS_BUILD_EMU=0)")
    monkeypatch.delenv("SSL_OPS_CUDA_CONTRASTIVE_ROUTE", raising=False)


def both_ways(fn, *tensors):
    """fn on the CPU kernels and on the emulated CUDA route, with the gradients
    of the tensors that require them."""
    results = []
    for emulate in (False, True):
        inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
        with emulation.use_emulated_kernels() if emulate else contextlib.nullcontext():
            out = fn(*inputs)
            grads = torch.autograd.grad(out.sum(), [t for t in inputs if t.requires_grad])
        results.append((out.detach(), grads))
    return results


def assert_same(results, rtol=2e-5):
    (cpu, cpu_grads), (emu, emu_grads) = results
    torch.testing.assert_close(emu, cpu, rtol=rtol, atol=rtol * cpu.abs().max().item())
    for a, b in zip(emu_grads, cpu_grads):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


def rand(*shape, grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def test_every_public_loss_runs_the_cuda_route():
    z0, z1 = rand(40, 16, seed=1), rand(40, 16, seed=2)
    assert_same(both_ways(lambda a, b: ssl_ops.nt_xent_loss(a, b, 0.2), z0, z1))
    labels = torch.arange(20).repeat(4)
    assert_same(both_ways(lambda a, b: ssl_ops.nt_xent_loss(torch.cat([a, b]), labels=labels, temperature=0.3),
                          z0, z1))
    queue = rand(300, 16, grad=False, seed=3)
    assert_same(both_ways(lambda q, k, u: ssl_ops.info_nce_loss(q, k, u, 0.07), z0, z1.detach(), queue))
    assert_same(both_ways(lambda q, k: ssl_ops.info_nce_loss(q, k, temperature=0.1, symmetric=True), z0, z1))
    assert_same(both_ways(lambda p, z: ssl_ops.byol_loss(p, z, reduction="none"), z0, z1.detach()))
    assert_same(both_ways(lambda a, b: ssl_ops.negative_cosine_similarity(a, b), z0, z1))
    assert_same(both_ways(lambda a, b: ssl_ops.cosine_similarity_matrix(a, b), z0, z1))
    bank_loss = ssl_ops.NTXentLoss(0.2, memory_bank_size=(64, 16))
    bank = bank_loss.memory_bank.bank
    bank.copy_(torch.randn(bank.shape, generator=torch.Generator().manual_seed(4)))
    states = [copy.deepcopy(bank_loss) for _ in range(2)]
    results = []
    for emulate, module in zip((False, True), states):
        a, b = z0.detach().clone().requires_grad_(), z1.detach().clone()
        with emulation.use_emulated_kernels() if emulate else contextlib.nullcontext():
            loss = module(a, b)
            results.append((loss.detach(), torch.autograd.grad(loss, [a])))
    assert_same(results)
    torch.testing.assert_close(states[0].memory_bank.bank, states[1].memory_bank.bank)


def test_ema_update_runs_the_cuda_route():
    online = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.BatchNorm1d(5))
    start = copy.deepcopy(online).requires_grad_(False)
    for p in start.parameters():
        p.add_(torch.randn_like(p))
    ema = [copy.deepcopy(start) for _ in range(2)]
    ssl_ops.ema_update_(ema[0], online, 0.99)
    launches = emulation.load().launch_count()
    with emulation.use_emulated_kernels():
        ssl_ops.ema_update_(ema[1], online, 0.99)
    assert emulation.load().launch_count() > launches  # the CUDA kernel ran
    for a, b in zip(ema[0].state_dict().values(), ema[1].state_dict().values()):
        assert torch.equal(a, b)  # both backends compute the same fma, bit for bit


def gemm_flop_share(fn, inputs, eager_flops):
    torch.set_num_threads(1)
    with emulation.use_emulated_kernels(), torch.profiler.profile(with_flops=True) as prof:
        loss = fn(*inputs)
        loss.backward()
    counted = sum(e.flops for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm") and e.flops)
    return counted / eager_flops


def test_gemm_route_puts_the_products_in_vendor_gemms():
    """Issue 12's bar: at least 45% of the eager loss's matrix-multiply FLOPs in
    ATen GEMM calls (this route: all of them)."""
    threads = torch.get_num_threads()
    try:
        z0, z1 = rand(384, 64, seed=5), rand(384, 64, seed=6)
        share = gemm_flop_share(lambda a, b: ssl_ops.nt_xent_loss(a, b, 0.5), (z0, z1), 6 * 768**2 * 64)
        assert share >= 0.45, share
        q, k, queue = rand(64, 64, seed=7), rand(64, 64, grad=False, seed=8), rand(2048, 64, grad=False, seed=9)
        share = gemm_flop_share(lambda a, b, c: ssl_ops.info_nce_loss(a, b, c, 0.2), (q, k, queue), 4 * 64 * 2048 * 64)
        assert share >= 0.45, share
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.bfloat16, 256), (torch.float16, 256),
                                     ("tf32", 128)], ids=str)
def test_fused_route_trains_without_vendor_gemms(dtype, d):
    """Issue 22's bar: with half rows of up to 256 features (and fp32 rows of up
    to 128 where TF32 is allowed), NT-Xent and MoCo forward and backward through
    the public API run the fused kernels and not one vendor GEMM (no aten::mm in
    the profile), and match the float64 reference."""
    from test_fused_route import as_dtype, fused_kernel_runs, tf32_allowed
    from tolerances import assert_close, rtol

    real = as_dtype(dtype)
    z0, z1, q = (rand(rows, d, seed=s).to(real).detach().requires_grad_() for rows, s in ((70, 11), (70, 12), (66, 13)))
    k, queue = (rand(rows, d, grad=False, seed=s).to(real) for rows, s in ((66, 14), (300, 15)))
    cases = [  # (loss, its inputs, which of them take a gradient)
        (ssl_ops.nt_xent_loss, reference.nt_xent_loss, (z0, z1, 0.5), (0, 1)),
        (ssl_ops.info_nce_loss, reference.info_nce_loss, (q, k, queue, 0.2), (0,)),  # MoCo: keys and queue detached
    ]
    tol = rtol(real, length=370 + d, logit_scale=5.0, tf32=dtype == "tf32")
    with tf32_allowed(dtype == "tf32"):
        for ours, theirs, args, wanted in cases:
            with emulation.use_emulated_kernels(), fused_kernel_runs():
                loss = ours(*args)
                grads = torch.autograd.grad(loss, [args[i] for i in wanted])
            wide = [a.detach().double().requires_grad_(i in wanted) if torch.is_tensor(a) else a
                    for i, a in enumerate(args)]
            expected = theirs(*wide)
            ref_grads = torch.autograd.grad(expected, [wide[i] for i in wanted])
            assert_close(loss, expected, tol, f"{ours.__name__} loss")
            for got, want in zip(grads, ref_grads):
                assert_close(got, want, tol, f"{ours.__name__} gradient")


# ATen ops that launch no kernel on a GPU (views, metadata, allocation).
NO_LAUNCH = {"aten::empty", "aten::empty_strided", "aten::narrow", "aten::select", "aten::slice", "aten::detach",
             "aten::view", "aten::t", "aten::transpose", "aten::as_strided", "aten::unsqueeze", "aten::squeeze",
             "aten::alias", "aten::expand", "aten::reshape", "aten::_reshape_alias", "aten::lift_fresh",
             "aten::resolve_conj", "aten::resolve_neg", "aten::contiguous"}


def launches_in_a_step(fn, inputs):
    """Our kernels plus the ATen ops that would launch one, in a forward and
    backward of fn (after a warm-up step)."""
    module = emulation.load()
    with emulation.use_emulated_kernels():
        fn(*inputs).backward()
        for t in inputs:
            t.grad = None  # as after optimizer.zero_grad(): no accumulation into .grad
        before = module.launch_count()
        with torch.profiler.profile() as prof:
            fn(*inputs).backward()
        ours = module.launch_count() - before
    aten = []
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name in NO_LAUNCH:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:  # top-level ATen ops only: their children run inside them
            aten.append(event.name)
    return ours, aten


def test_a_training_step_is_about_a_dozen_launches():
    """Launch count is what small GPU shapes pay for (the GEMM route's NT-Xent
    step was 34, MoCo's 55): an NT-Xent and a MoCo step on the fused route
    (bf16) stay at about a dozen, our kernels and ATen's together."""
    z0, z1 = (rand(256, 128, seed=s).bfloat16().detach().requires_grad_() for s in (21, 22))
    ours, aten = launches_in_a_step(lambda a, b: ssl_ops.nt_xent_loss(a, b, 0.5), (z0, z1))
    assert ours + len(aten) <= 14, (ours, aten)
    q = rand(64, 128, seed=23).bfloat16().detach().requires_grad_()
    k, queue = rand(64, 128, grad=False, seed=24).bfloat16(), rand(512, 128, grad=False, seed=25).bfloat16()
    ours, aten = launches_in_a_step(lambda a: ssl_ops.info_nce_loss(a, k, queue, 0.2), (q,))
    assert ours + len(aten) <= 13, (ours, aten)
