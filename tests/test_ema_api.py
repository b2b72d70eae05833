"""The Python API ssl_ops.ema_update_ (modules, iterables, buffers), the
reference, opcheck, version counters and torch.compile."""

import copy

import pytest
import torch
from torch import nn

import ssl_ops
from ssl_ops import reference


def make_net(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    net.train()
    net(torch.randn(16, 5))  # moves the BatchNorm statistics away from their defaults
    return net


def params_and_buffers(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("mode", ["copy", "ema", "skip"])
def test_module_update_and_buffer_modes(mode):
    online, ema = make_net(0), make_net(1)
    online(torch.randn(16, 5))  # num_batches_tracked 2 against the EMA's 1
    ema_before, online_state = params_and_buffers(ema), params_and_buffers(online)
    m = 0.9
    assert ssl_ops.ema_update_(ema, online, m, buffers=mode) is None
    state = ema.state_dict()
    for name, _ in online.named_parameters():
        expected = m * ema_before[name].double() + (1 - m) * online_state[name].double()
        torch.testing.assert_close(state[name].double(), expected, rtol=1e-6, atol=1e-6)
    for name in ("1.running_mean", "1.running_var"):
        if mode == "copy":
            assert torch.equal(state[name], online_state[name])
        elif mode == "skip":
            assert torch.equal(state[name], ema_before[name])
        else:
            expected = m * ema_before[name].double() + (1 - m) * online_state[name].double()
            torch.testing.assert_close(state[name].double(), expected, rtol=1e-6, atol=1e-6)
    # Integer buffers: copied with "copy" and "ema", left alone with "skip" (as lightly).
    expected = ema_before if mode == "skip" else online_state
    assert torch.equal(state["1.num_batches_tracked"], expected["1.num_batches_tracked"])


def test_default_touches_parameters_only_as_lightly_does():
    """lightly's update_momentum(model, model_ema, m) and solo-learn's
    MomentumUpdater average parameters and leave every buffer alone; so do
    ema_update_ and MomentumEncoder by default."""
    utils = pytest.importorskip("lightly.models.utils")
    online, ema = make_net(0), make_net(1)
    online(torch.randn(16, 5))
    theirs = copy.deepcopy(ema)
    encoder = ssl_ops.MomentumEncoder(online)
    encoder.module.load_state_dict(ema.state_dict())
    ssl_ops.ema_update_(ema, online, 0.99)
    encoder.update(online, 0.99)
    utils.update_momentum(online, theirs, 0.99)
    for ours in (ema.state_dict(), encoder.module.state_dict()):
        for name, value in theirs.state_dict().items():
            torch.testing.assert_close(ours[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_matches_reference_loop_and_foreach_lerp():
    online, ema = make_net(0), make_net(1)
    ema_ref, ema_lerp = copy.deepcopy(ema), copy.deepcopy(ema)
    m = 0.99
    ssl_ops.ema_update_(ema.parameters(), online.parameters(), m)
    reference.ema_update_(list(ema_ref.parameters()), list(online.parameters()), m)
    with torch.no_grad():
        torch._foreach_lerp_(list(ema_lerp.parameters()), list(online.parameters()), 1 - m)
    for a, b, c in zip(ema.parameters(), ema_ref.parameters(), ema_lerp.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)


def test_fp32_ema_of_bf16_model():
    online = make_net(0).to(torch.bfloat16)
    ema = make_net(1)
    before = params_and_buffers(ema)
    ssl_ops.ema_update_(ema, online, 0.5, buffers="skip")
    for (name, p), o in zip(ema.named_parameters(), online.parameters()):
        assert p.dtype == torch.float32
        expected = 0.5 * before[name].double() + 0.5 * o.double()
        torch.testing.assert_close(p.double(), expected, rtol=1e-6, atol=1e-7)


def test_ema_parameters_requiring_grad_and_version_counter():
    online, ema = make_net(0), make_net(1)
    versions = [p._version for p in ema.parameters()]
    ssl_ops.ema_update_(ema, online, 0.9)  # runs under no_grad although they require grad
    assert all(p._version > v for p, v in zip(ema.parameters(), versions))


def test_module_errors_change_nothing():
    online, ema = make_net(0), make_net(1)
    before = params_and_buffers(ema)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 2"):
        ssl_ops.ema_update_(ema, online, 2.0)
    with pytest.raises(ValueError, match="buffers must be one of"):
        ssl_ops.ema_update_(ema, online, 0.9, buffers="average")
    with pytest.raises(TypeError, match="both be nn.Modules or both iterables"):
        ssl_ops.ema_update_(ema, list(online.parameters()), 0.9)
    other = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"different parameters: \['4.bias', '4.weight'\]"):
        ssl_ops.ema_update_(ema, other, 0.9)
    wrong_buffer = make_net(0)
    wrong_buffer[1].running_mean = torch.zeros(3)
    with pytest.raises(ValueError, match=r"buffer '1.running_mean' has shape \(3,\) in online but \(8,\) in ema"):
        ssl_ops.ema_update_(ema, wrong_buffer, 0.9, buffers="copy")
    after = params_and_buffers(ema)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_generators_and_empty_lists():
    ema = [torch.randn(3), torch.randn(4)]
    online = [torch.randn(3), torch.randn(4)]
    expected = [0.9 * e + 0.1 * o for e, o in zip(ema, online)]
    ssl_ops.ema_update_((e for e in ema), (o for o in online), 0.9)
    for a, b in zip(ema, expected):
        torch.testing.assert_close(a, b)
    ssl_ops.ema_update_([], [], 0.9)


def test_opcheck():
    ema = [torch.randn(5, 3), torch.randn(7), torch.randn(0)]
    online = [torch.randn(5, 3), torch.randn(7), torch.randn(0)]
    torch.library.opcheck(torch.ops.ssl_ops.ema_update_.default, (ema, online, 0.9))
    mixed_ema = [torch.randn(4), torch.randn(6, dtype=torch.float64)]
    mixed_online = [torch.randn(4).bfloat16(), torch.randn(6, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.ssl_ops.ema_update_.default, (mixed_ema, mixed_online, 0.5))


@pytest.mark.cuda
def test_opcheck_cuda():
    if not ssl_ops.cuda_kernels_available():
        pytest.skip("needs CUDA kernels and a GPU")
    ema = [torch.randn(5, 3, device="cuda"), torch.randn(7, device="cuda")]
    online = [torch.randn(5, 3, device="cuda"), torch.randn(7, device="cuda")]
    torch.library.opcheck(torch.ops.ssl_ops.ema_update_.default, (ema, online, 0.9))


@pytest.mark.parametrize("backend_name", ["aot_eager", "inductor"])
def test_compiled_training_step(backend_name):
    """A training step compiled with fullgraph=True: forward, loss, backward and
    optimizer step eagerly around it, the momentum update inside the graph."""
    torch._dynamo.reset()
    online, ema = make_net(0), make_net(1)
    online_ref, ema_ref = copy.deepcopy(online), copy.deepcopy(ema)

    def forward_loss(net, x):
        return net(x).pow(2).mean()

    def momentum_update(ema_net, net, m):
        ssl_ops.ema_update_(ema_net, net, m)

    compiled_loss = torch.compile(forward_loss, fullgraph=True, backend=backend_name)
    compiled_update = torch.compile(momentum_update, fullgraph=True, backend=backend_name)
    opt = torch.optim.SGD(online.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(online_ref.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(16, 5)
        m = ssl_ops.cosine_schedule(step, 3, 0.9, 1.0)
        for net, ema_net, optimizer, loss_fn, update in (
            (online, ema, opt, compiled_loss, compiled_update),
            (online_ref, ema_ref, opt_ref, forward_loss, momentum_update),
        ):
            optimizer.zero_grad()
            loss_fn(net, x).backward()
            optimizer.step()
            update(ema_net, net, m)
    for a, b in zip(ema.state_dict().values(), ema_ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_raw_op_on_tensor_lists():
    torch._dynamo.reset()
    ema = [torch.randn(6), torch.randn(2, 3)]
    online = [torch.randn(6), torch.randn(2, 3)]
    expected = [e.clone() for e in ema]
    torch.ops.ssl_ops.ema_update_(expected, online, 0.75)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def update(e, o):
        torch.ops.ssl_ops.ema_update_(e, o, 0.75)

    update(ema, online)
    for a, b in zip(ema, expected):
        assert torch.equal(a, b)


def test_momentum_encoder():
    online = make_net(0)
    encoder = ssl_ops.MomentumEncoder(online)
    assert all(not p.requires_grad for p in encoder.parameters())
    before = {k: v.clone() for k, v in encoder.module.state_dict().items()}
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    encoder.update(online, 0.9)
    for (name, p), o in zip(encoder.module.named_parameters(), online.parameters()):
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * o)
    x = torch.randn(4, 5)
    encoder.eval(), online.eval()
    assert encoder(x).shape == online(x).shape
