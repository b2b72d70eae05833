"""EMA kernel cases, run on every backend: the CPU kernel, the CUDA kernel on the
host emulator under several thread orders, and the CUDA kernel on a GPU."""

import math
from fractions import Fraction

import pytest
import torch

import ssl_ops
from ssl_ops import emulation

MOMENTUM = 0.996
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
]


def pair_id(pair):
    return "-".join(str(t).replace("torch.", "") for t in pair)


def randn(shape, dtype, device):
    return torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)


def make_lists(sizes, dtypes, device):
    ema = [randn(s, dtypes[0], device) for s in sizes]
    online = [randn(s, dtypes[1], device) for s in sizes]
    return ema, online


def assert_matches_float64(result, ema_before, online, momentum):
    """Against the float64 reference, within the rounding of the result's dtype:
    one rounding of w * online, one of the fma and one to the EMA dtype."""
    for r, e, o in zip(result, ema_before, online):
        e64, o64 = e.double().cpu(), o.double().cpu()
        ref = momentum * e64 + (1 - momentum) * o64
        compute_eps = torch.finfo(torch.float64 if r.dtype == torch.float64 else torch.float32).eps
        bound = torch.finfo(r.dtype).eps * ref.abs() + 2 * compute_eps * (e64.abs() + o64.abs())
        err = (r.double().cpu() - ref).abs()
        assert bool((err <= bound).all()), f"max error {err.max().item()} for {r.dtype}"


def run(backend, ema, online, momentum, chunk_size=None):
    if chunk_size is None:
        backend.ops.ema_update_(ema, online, momentum)
    else:
        backend.ops._ema_update_chunked_(ema, online, momentum, chunk_size)


def fp32_fma_oracle(ema, online, momentum):
    """The kernels' expression, fma(m, ema, w * online) in fp32 with m and w = 1 - m
    rounded once from double, evaluated exactly here without a fused multiply-add:
    m * ema is exact in double (24 + 24 bits); TwoSum gives the double sum s and
    its error exactly; rounding s to fp32 is wrong only when s is a tie between
    two floats, where the error's sign decides. Then one rounding to the EMA dtype."""
    m = torch.tensor(momentum, dtype=torch.float32)
    w = torch.tensor(1.0 - momentum, dtype=torch.float64).float()
    t = (w * online.cpu().float()).double()  # fp32 product, rounded once
    p = m.double() * ema.cpu().float().double()
    s = p + t
    t_virtual = s - p
    err = (p - (s - t_virtual)) + (t - t_virtual)  # TwoSum: s + err == p + t exactly
    r = s.float()
    d = s - r.double()
    neighbour = torch.nextafter(r, torch.where(d > 0, math.inf, -math.inf).float())
    tie = (d != 0) & ((neighbour.double() - r.double()).abs() == 2 * d.abs())
    r = torch.where(tie & (err != 0) & (torch.sign(err) == torch.sign(d)), neighbour, r)
    return r.to(ema.dtype)


def fp64_fma_oracle(ema, online, momentum):
    """fma(m, ema, w * online) in double, exactly: Fractions hold m * ema + t
    without rounding, and int / int (Fraction -> float) rounds correctly."""
    m, w = Fraction(momentum), 1.0 - momentum
    out = [float(m * Fraction(e) + Fraction(w * o)) for e, o in zip(ema.cpu().flatten().tolist(),
                                                                   online.cpu().double().flatten().tolist())]
    return torch.tensor(out, dtype=torch.float64).reshape(ema.shape)


def expected_bits(ema, online, momentum):
    """The kernels' expression evaluated independently of them."""
    if ema.dtype == torch.float64:
        return fp64_fma_oracle(ema, online, momentum)
    return fp32_fma_oracle(ema, online, momentum)


def check_case(backend, ema, online, momentum=MOMENTUM, chunk_size=None):
    before = [e.clone() for e in ema]
    want = [expected_bits(e, o, momentum) for e, o in zip(before, online)]
    run(backend, ema, online, momentum, chunk_size)
    assert_matches_float64(ema, before, online, momentum)
    # Every backend computes the same expression, so each equals it bit for bit.
    for got, expected in zip(ema, want):
        assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=pair_id)
@pytest.mark.parametrize("numel", [0, 1, 7, 1023, 4097, 65536 + 3])
def test_sizes_and_dtypes(backend, dtypes, numel):
    ema, online = make_lists([numel, (3, 5)], dtypes, backend.device)
    check_case(backend, ema, online)


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.5, 0.9999])
def test_momentum_values(backend, momentum):
    ema, online = make_lists([100, 33], (torch.float32, torch.float32), backend.device)
    before = [e.clone() for e in ema]
    check_case(backend, ema, online, momentum)
    if momentum == 1.0:
        assert all(torch.equal(a, b) for a, b in zip(ema, before))
    if momentum == 0.0:
        assert all(torch.equal(a, b) for a, b in zip(ema, online))


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS[:4], ids=pair_id)
def test_unaligned_storage_offsets(backend, dtypes):
    # Views starting 1..3 elements into their storage: the vector path must not
    # be taken for them, and ema and online may be misaligned differently.
    ema, online = [], []
    for ema_offset, online_offset, n in [(1, 0, 301), (2, 3, 64), (3, 1, 1), (0, 2, 4099)]:
        ema.append(randn(n + 4, dtypes[0], backend.device)[ema_offset : ema_offset + n])
        online.append(randn(n + 4, dtypes[1], backend.device)[online_offset : online_offset + n])
    check_case(backend, ema, online)


def test_many_tensors_mixed_dtypes(backend):
    # More tensors than one launch's table holds, with every dtype pair interleaved.
    gen = torch.Generator().manual_seed(1)
    sizes = torch.randint(1, 300, (300,), generator=gen).tolist()
    ema, online = [], []
    for i, n in enumerate(sizes):
        dtypes = DTYPE_PAIRS[i % len(DTYPE_PAIRS)]
        ema.append(randn(n, dtypes[0], backend.device))
        online.append(randn(n, dtypes[1], backend.device))
    check_case(backend, ema, online)


def test_non_dense_and_strided_layouts(backend):
    device = backend.device
    base = randn((20, 30), torch.float32, device)
    ema_strided = base[:, ::3]  # not dense: updated through a dense stand-in
    ema_channels_last = randn((2, 3, 4, 5), torch.float32, device).to(memory_format=torch.channels_last)
    ema_transposed = randn((7, 9), torch.float32, device).t()
    online = [
        randn(ema_strided.shape, torch.float32, device),
        randn((2, 3, 4, 5), torch.float32, device),  # contiguous against channels_last
        randn((9, 7), torch.float32, device),
    ]
    base_before = base.clone()
    check_case(backend, [ema_strided, ema_channels_last, ema_transposed], online)
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched[:, ::3] = False
    assert torch.equal(base[untouched], base_before[untouched])


def test_chunks_overflow_one_launch(cuda_source_backend):
    # With 64-element chunks, 3100 chunks of one tensor overflow the largest block
    # table (3072 chunks with CUDA 12.1+; 320 under the emulator and older CUDA), and
    # 600 small tensors overflow the largest tensor table (512; 96).
    backend = cuda_source_backend
    sizes = [64 * 3100 + 5] + [17] * 600 + [64 * 5]
    ema, online = make_lists(sizes, (torch.float32, torch.bfloat16), backend.device)
    launches_before = emulation.load().launch_count() if backend.seed is not None else None
    check_case(backend, ema, online, chunk_size=64)
    if launches_before is not None:
        # The emulator's 4 KB table: 3106 chunks of the first tensor need 10 launches,
        # then 96 tensors per table: at least 16 launches.
        assert emulation.load().launch_count() - launches_before >= 16


@pytest.mark.emu
@pytest.mark.parametrize("driver,launches", [(12000, 2), (12010, 1)])
def test_parameter_tables_follow_the_driver(driver, launches):
    """The 32 KB tables of Note [EMA chunk lists] only with a 12.1+ driver: on an
    older one (r525-r529) the kernel keeps the 4 KB table, which the emulator
    enforces as a real launch would. 400 chunks overflow the 4 KB table (320
    chunks: a second launch) but fit the large one."""
    from conftest import make_backend

    backend = make_backend(("emu", 1))
    sizes = [8 * 300 + 3] + [8] * 99
    ema, online = make_lists(sizes, (torch.float32, torch.float32), backend.device)
    emu = emulation.load()
    emu.set_driver_version(driver)
    try:
        before = emu.launch_count()
        check_case(backend, ema, online, chunk_size=8)
        assert emu.launch_count() - before == launches
    finally:
        emu.set_driver_version(12000)


def test_chunk_size_is_validated(cuda_source_backend):
    ema, online = make_lists([10], (torch.float32, torch.float32), cuda_source_backend.device)
    with pytest.raises(ValueError, match="chunk_size must be a positive multiple of 8, got 12"):
        run(cuda_source_backend, ema, online, 0.5, chunk_size=12)


# ---- Bad input: a clear error and every tensor left bit-identical ----------------------


def bad_cases(device):
    def f32(*shape):
        return randn(shape, torch.float32, device)

    base = f32(10)
    shared = f32(8)
    return {
        "momentum-negative": ([f32(4)], [f32(4)], -0.1, ValueError, r"momentum must be in \[0, 1\], got -0.1"),
        "momentum-above-one": ([f32(4)], [f32(4)], 1.5, ValueError, r"got 1.5"),
        "momentum-nan": ([f32(4)], [f32(4)], math.nan, ValueError, r"got nan"),
        "lengths": ([f32(4), f32(3)], [f32(4)], 0.9, ValueError, r"same length, got 2 and 1"),
        "shape": ([f32(4), f32(2, 3)], [f32(4), f32(3, 2)], 0.9, ValueError,
                  r"online\[1\] has shape \[3, 2\] but ema\[1\] has shape \[2, 3\]"),
        "integer-ema": ([f32(4), torch.arange(4, device=device)], [f32(4), torch.arange(4, device=device)],
                        0.9, TypeError, r"ema\[1\] must be a floating-point tensor, got dtype Long"),
        "dtype": ([f32(4), f32(3).half()], [f32(4), f32(3)], 0.9, TypeError,
                  r"online\[1\] has dtype Float but ema\[1\] has dtype Half"),
        "dtype-wider-online": ([f32(4), f32(3)], [f32(4), f32(3).double()], 0.9, TypeError,
                               r"online\[1\] has dtype Double but ema\[1\] has dtype Float"),
        "alias": ([f32(4), base], [f32(4), base], 0.9, RuntimeError,
                  r"online\[1\] shares memory with ema\[1\]"),
        "partial-overlap": ([f32(4), shared[:6]], [f32(4), shared[2:]], 0.9, RuntimeError,
                            r"online\[1\] shares memory with ema\[1\]"),
        "duplicate-ema": ([base, f32(3), base], [f32(10), f32(3), f32(10)], 0.9, RuntimeError,
                          r"ema\[0\] and ema\[2\] share memory"),
        "expanded-ema": ([f32(4), f32(1).expand(5)], [f32(4), f32(5)], 0.9, RuntimeError,
                         r"ema\[1\] has internally overlapping memory"),
    }


@pytest.mark.parametrize("case", list(bad_cases("cpu")))
def test_bad_input_changes_nothing(backend, case):
    ema, online, momentum, error, message = bad_cases(backend.device)[case]
    ema_before = [e.clone() for e in ema]
    online_before = [o.clone() for o in online]
    with pytest.raises(error, match=message):
        run(backend, ema, online, momentum)
    assert all(torch.equal(a, b) for a, b in zip(ema, ema_before))
    assert all(torch.equal(a, b) for a, b in zip(online, online_before))


@pytest.mark.cuda
def test_mixed_devices_change_nothing():
    if not ssl_ops.cuda_kernels_available():
        pytest.skip("needs CUDA kernels and a GPU")
    ema = [torch.randn(4, device="cuda"), torch.randn(4, device="cuda")]
    online = [torch.randn(4, device="cuda"), torch.randn(4)]
    before = [e.clone() for e in ema]
    with pytest.raises(RuntimeError, match=r"online\[1\] is on cpu but ema\[0\] is on cuda:0"):
        torch.ops.ssl_ops.ema_update_(ema, online, 0.9)
    assert all(torch.equal(a, b) for a, b in zip(ema, before))
