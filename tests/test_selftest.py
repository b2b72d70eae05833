"""python -m ssl_ops.selftest and the SSL_OPS_EAGER escape hatch it points to."""

import pytest
import torch

import ssl_ops
from ssl_ops import _fallback, emulation, reference, selftest


def test_selftest_passes_on_cpu(capsys):
    assert selftest.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("nt_xent", "supcon", "moco", "mocov3", "byol", "cosine_matrix", "ema_update_"):
        assert f"PASS  {name} " in out


@pytest.mark.emu
def test_selftest_passes_under_the_emulator(capsys):
    if not emulation.available():
        pytest.skip("the emulation module is not built")
    if emulation.module_name() != "_cuda_emu":
        pytest.skip("the kernels' own tests cover the ASan pass; this one would take minutes there")
    assert selftest.main(["--emulate"]) == 0
    out = capsys.readouterr().out
    for route in ("fused", "gemm"):
        assert f"PASS  nt_xent             {route}" in out
    assert "PASS  cosine_matrix       tiles" in out
    assert "nt_xent             tiles" not in out  # the contrastive losses have no tile route


def test_selftest_reports_a_wrong_op_and_the_setting_that_avoids_it(capsys, monkeypatch):
    real = ssl_ops.nt_xent_loss
    monkeypatch.setattr(ssl_ops, "nt_xent_loss", lambda *a, **k: real(*a, **k) * 1.001)
    assert selftest.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  nt_xent " in out and "PASS  moco " in out
    assert "set SSL_OPS_EAGER=contrastive" in out


def _loss_and_grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out.sum(), leaves)]


@pytest.mark.parametrize("family, fn", [
    ("contrastive", lambda a, b: ssl_ops.nt_xent_loss(a, b, 0.2)),
    ("contrastive", lambda a, b: ssl_ops.nt_xent_loss(torch.cat([a, b]), labels=torch.tensor([0, 1, 0, 2, 1, 0] * 2))),
    ("contrastive", lambda a, b: ssl_ops.nt_xent_loss(torch.cat([a, b]), labels=torch.tensor([0, 1, 0, 2, 1, 3] * 2),
                                                      positives="logsumexp", reduction="none")),
    ("contrastive", lambda a, b: ssl_ops.info_nce_loss(a, b, torch.cat([a, b]).detach() * 0.5, 0.1)),
    ("contrastive", lambda a, b: ssl_ops.info_nce_loss(a, b, temperature=0.3, symmetric=True, reduction="none")),
    ("cosine", lambda a, b: ssl_ops.byol_loss(a, b)),
    ("cosine", lambda a, b: ssl_ops.negative_cosine_similarity(a, b)),
    ("cosine_matrix", lambda a, b: ssl_ops.cosine_similarity_matrix(a, b)),
])
def test_eager_fallback_computes_the_same_function(family, fn, monkeypatch):
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    kernel = _loss_and_grads(fn, inputs)
    monkeypatch.setenv("SSL_OPS_EAGER", family)
    eager = _loss_and_grads(fn, inputs)
    for k, e in zip(kernel, eager):
        torch.testing.assert_close(k, e, rtol=1e-10, atol=1e-12)


def test_eager_fallback_ema(monkeypatch):
    ema, online = [torch.randn(10), torch.randn(3, 4)], [torch.randn(10), torch.randn(3, 4)]
    expected = [e.clone() for e in ema]
    reference.ema_update_(expected, online, 0.9)
    monkeypatch.setenv("SSL_OPS_EAGER", "ema,cosine")
    ssl_ops.ema_update_(ema, online, 0.9)
    assert all(torch.equal(e, x) for e, x in zip(ema, expected))


def test_eager_fallback_rejects_unknown_names(monkeypatch):
    monkeypatch.setenv("SSL_OPS_EAGER", "contrastive,nt_xnet")
    with pytest.raises(ValueError, match=r"unknown op families \['nt_xnet'\]"):
        _fallback.eager_requested("contrastive")
