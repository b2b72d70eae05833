"""Issue 25: the EMA with a tensor momentum (bits of the number's update on
every backend; read by the kernel, so no host sync, no recompilation under
torch.compile, and CUDA graphs replay the current value), the prepared update
ssl_ops.EMA (bits of the functional one), DTensor shards over 2 gloo ranks,
and bad input that leaves every tensor as it was."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ssl_ops

DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
               (torch.float32, torch.float16)]


def make_lists(sizes, dtypes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ema = [torch.randn(s, generator=g, dtype=torch.float64).to(dtypes[0]).to(device) for s in sizes]
    online = [torch.randn(s, generator=g, dtype=torch.float64).to(dtypes[1]).to(device) for s in sizes]
    return ema, online


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("momentum_dtype", [torch.float32, torch.float64], ids=str)
def test_tensor_momentum_is_the_numbers_update_bit_for_bit(backend, dtypes, momentum_dtype):
    """Both forms round m and 1 - m from the same double: identical bits, on
    the CPU kernel and on the CUDA kernel (emulated under every seed; on a GPU
    when present), across several launches (chunks of 8 elements)."""
    sizes = [(3, 5), (1000,), (0,), (17,)]
    momentum = torch.tensor(0.9921875 + 1e-9, dtype=momentum_dtype, device=backend.device)
    ema, online = make_lists(sizes, dtypes, backend.device)
    expected = [e.clone() for e in ema]
    backend.ops.ema_update_(expected, online, float(momentum.item()))
    if backend.name == "cpu":
        backend.ops.ema_update_tensor_(ema, online, momentum)
    else:
        backend.ops._ema_update_tensor_chunked_(ema, online, momentum, 8)
    for a, b in zip(ema, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_bad_tensor_momentum_changes_nothing(backend, value):
    """CPU: an error before any write. CUDA source: the host never reads the
    value (it cannot without a sync); the kernel traps before writing (the
    emulator reports the trap as the launch's error)."""
    ema, online = make_lists([(64,), (9,)], (torch.float32, torch.float32), backend.device)
    before = [e.clone() for e in ema]
    momentum = torch.tensor(value, device=backend.device)
    match = "momentum must be in" if backend.name == "cpu" else "trap"
    with pytest.raises((ValueError, RuntimeError), match=match):
        backend.ops.ema_update_tensor_(ema, online, momentum)
        if backend.device.type == "cuda":
            torch.cuda.synchronize()
    for a, b in zip(ema, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("momentum,match", [
    (torch.ones(2), "one element"),
    (torch.tensor(1, dtype=torch.int64), "float32 or float64"),
    (torch.tensor(0.5, dtype=torch.float16), "float32 or float64"),
])
def test_momentum_tensor_is_validated(backend, momentum, match):
    ema, online = make_lists([(8,)], (torch.float32, torch.float32), backend.device)
    before = ema[0].clone()
    with pytest.raises((ValueError, TypeError), match=match):
        backend.ops.ema_update_tensor_(ema, online, momentum.to(backend.device))
    assert torch.equal(ema[0], before)


def small_models(seed=0):
    torch.manual_seed(seed)
    online = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    online(torch.randn(8, 6))  # BN statistics differ from the copy's
    return copy.deepcopy(online), online


@pytest.mark.parametrize("buffers", ["skip", "copy", "ema"])
def test_prepared_update_is_the_functional_one_bit_for_bit(buffers):
    ema_a, online = small_models()
    ema_b = copy.deepcopy(ema_a)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    prepared = ssl_ops.EMA(ema_b, online, buffers=buffers)
    for step, m in enumerate([0.9, 0.99, torch.tensor(0.95), torch.tensor(0.5, dtype=torch.float64)]):
        online(torch.randn(8, 6))  # the BN statistics move: "copy" and "ema" have work to do
        ssl_ops.ema_update_(ema_a, online, m, buffers=buffers)
        prepared.update(m)
        for a, b in zip(ema_a.state_dict().values(), ema_b.state_dict().values()):
            assert torch.equal(a, b), step


def test_prepared_update_follows_moved_storage():
    ema_m, online = small_models(1)
    prepared = ssl_ops.EMA(ema_m, online)
    weight = ema_m[0].weight
    weight.data = weight.data.clone()  # new storage under the same parameter
    expected = 0.5 * weight.detach() + 0.5 * online[0].weight.detach()
    prepared.update(0.5)
    torch.testing.assert_close(ema_m[0].weight.detach(), expected, rtol=0, atol=1e-7)


def test_prepared_update_validates_once_and_then_each_momentum():
    ema_m, online = small_models(2)
    with pytest.raises(ValueError, match="different parameters"):
        ssl_ops.EMA(ema_m, nn.Linear(6, 5))
    prepared = ssl_ops.EMA(ema_m, online)
    before = [p.clone() for p in ema_m.parameters()]
    for bad in (1.5, torch.tensor(-1.0)):
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
            prepared.update(bad)
    assert all(torch.equal(a, b) for a, b in zip(ema_m.parameters(), before))


def test_compiled_step_does_not_recompile_for_a_new_momentum():
    """A tensor momentum is a graph input, not a constant: one compilation for
    every value (dynamo's frame counter), and the values land."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    ema, online = make_lists([(4, 3), (7,)], (torch.float32, torch.float32), "cpu")
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(m):
        ssl_ops.ema_update_(ema, online, m)

    momentum = torch.tensor(0.0, dtype=torch.float64)  # holds each value exactly
    for value in (0.9, 0.95, 0.99, 0.5):
        expected = [e.clone() for e in ema]
        ssl_ops.ema_update_(expected, online, value)
        ssl_ops.cosine_schedule(0, 1, value, value, out=momentum)  # fills in place
        step(momentum)
        for a, b in zip(ema, expected):
            assert torch.equal(a, b)
    assert counter.frame_count == 1


def test_prepared_update_compiles_fullgraph():
    ema_m, online = small_models(4)
    reference = copy.deepcopy(ema_m)
    prepared = ssl_ops.EMA(ema_m, online)
    compiled = torch.compile(prepared.update, fullgraph=True, backend="eager")
    for value in (0.9, 0.7):
        compiled(torch.tensor(value, dtype=torch.float64))
        ssl_ops.ema_update_(reference, online, value)
        for a, b in zip(ema_m.state_dict().values(), reference.state_dict().values()):
            assert torch.equal(a, b)


def test_momentum_encoder_keeps_one_prepared_update():
    _, online = small_models(5)
    encoder = ssl_ops.MomentumEncoder(online)
    reference = copy.deepcopy(encoder.module)
    encoder.update(online, torch.tensor(0.9, dtype=torch.float64))
    prepared = encoder._prepared
    encoder.update(online, 0.8)
    assert encoder._prepared is prepared
    ssl_ops.ema_update_(reference, online, 0.9)
    ssl_ops.ema_update_(reference, online, 0.8)
    for a, b in zip(encoder.module.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_cosine_schedule_fills_a_tensor():
    m = torch.zeros(())
    out = ssl_ops.cosine_schedule(3, 10, 0.996, 1.0, out=m)
    assert out is m
    assert m.item() == pytest.approx(ssl_ops.cosine_schedule(3, 10, 0.996, 1.0), abs=1e-7)


@pytest.mark.cuda
def test_cuda_graph_replays_the_current_momentum():
    if not torch.cuda.is_available() or not ssl_ops.cuda_kernels_available():
        pytest.skip("needs a GPU")
    ema, online = make_lists([(1000,), (33,)], (torch.float32, torch.float32), "cuda")
    momentum = torch.tensor(0.9, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ssl_ops.ema_update_(ema, online, momentum)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ssl_ops.ema_update_(ema, online, momentum)
    for value in (0.5, 0.99):
        expected = [e.clone() for e in ema]
        ssl_ops.ema_update_(expected, online, value)
        momentum.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(ema, expected):
            assert torch.equal(a, b)


# ---- DTensor shards over 2 gloo ranks ------------------------------------------------

WORLD = 2


def _dtensor_worker(rank, store_path):
    import os

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        ema_full, online_full = make_lists([(6, 5), (9,), (4, 3)], (torch.float32, torch.float32), "cpu", seed=3)
        expected = [e.clone() for e in ema_full]
        ssl_ops.ema_update_(expected, online_full, 0.9)
        placements = [[Shard(0)], [Shard(0)], [Replicate()]]
        ema = [distribute_tensor(t, mesh, p) for t, p in zip(ema_full, placements)]
        online = [distribute_tensor(t, mesh, p) for t, p in zip(online_full, placements)]
        ssl_ops.ema_update_(ema, online, torch.tensor(0.9, dtype=torch.float64))
        for d, full in zip(ema, expected):
            assert torch.equal(d.full_tensor(), full)
        prepared = ssl_ops.EMA(ema, online)
        prepared.update(0.9)
        ssl_ops.ema_update_(expected, online_full, 0.9)
        for d, full in zip(ema, expected):
            assert torch.equal(d.full_tensor(), full)
        # A pair sharded differently: a clear error, and nothing written.
        bad_online = [distribute_tensor(online_full[0], mesh, [Replicate()])]
        before = ema[0].to_local().clone()
        try:
            ssl_ops.ema_update_([ema[0]], bad_online, 0.9)
        except ValueError as e:
            assert "ema[0]" in str(e) and "sharded as" in str(e), str(e)
        else:
            raise AssertionError("mismatched placements were accepted")
        assert torch.equal(ema[0].to_local(), before)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_dtensor_shards_are_updated_in_place(tmp_path):
    mp.spawn(_dtensor_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)
