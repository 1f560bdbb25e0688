"""Quantisation core: error bounds, packing, stochastic rounding, clamping, running ranges, edge values.

Every test runs three times: on the compiled CPU kernels, on the Triton kernels (the GPU path, run on CPU tensors by
Triton's interpreter) and on the PyTorch reference (LEANFORMER_NATIVE=0, LEANFORMER_TRITON=0); the parity tests at
the end compare the fused kernels with the reference directly.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leanformer import _native
from leanformer.memory.quantize import (
    KERNEL_SOURCE,
    QuantizedTensor,
    dequantize,
    ema_update,
    group_minmax,
    group_reduce_dims,
    make_noise_pool,
    pack_bits,
    pack_mask,
    quantize,
    ranges_are_finite,
    unpack_bits,
    unpack_mask,
)

BITS = (8, 4, 2)
GROUPS = ("head", "channel", "tensor", 1, 7, 64)


@pytest.fixture(autouse=True, params=["native", "triton", "reference"])
def path(request, monkeypatch):
    """Run each test on the compiled kernels, the Triton kernels and the PyTorch reference."""
    if request.param == "triton":
        request.getfixturevalue("triton_on_cpu")
    else:
        monkeypatch.setenv("LEANFORMER_TRITON", "0")
    monkeypatch.setenv("LEANFORMER_NATIVE", "1" if request.param == "native" else "0")
    return request.param


def _reference(fn):
    """fn() evaluated on the PyTorch reference path."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEANFORMER_NATIVE", "0")
        mp.setenv("LEANFORMER_TRITON", "0")
        return fn()


def _expand_step(q: QuantizedTensor, x: torch.Tensor) -> torch.Tensor:
    """Each element's step, shaped like x (int groups: via the padded grouped view)."""
    if isinstance(q.group, int):
        n = x.numel()
        per = q.step.expand(q.step.shape[0], q.group).reshape(-1)[:n]
        return per.view(x.shape)
    return q.step.expand(x.shape)


def _check_bound(x: torch.Tensor, q: QuantizedTensor, stochastic: bool) -> None:
    d = dequantize(q).float()
    step = _expand_step(q, x)
    bound = step if stochastic else step / 2
    err = (d - x.float()).abs()
    # fp32 arithmetic adds a few ulps of the values involved on top of the mathematical bound.
    slack = 1e-5 * (x.float().abs() + step * (2**q.bits)) + 1e-30
    assert torch.all(err <= bound + slack), float((err - bound - slack).max())


shapes = st.sampled_from([(2, 3, 5, 4), (3, 1, 2, 7), (5, 6), (11,), (2, 3, 9), (1, 2, 1, 1)])


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    bits=st.sampled_from(BITS),
    group=st.sampled_from(GROUPS),
    stochastic=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
    offset=st.sampled_from([0.0, 3.0, -1e3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_error_within_step(shape, bits, group, stochastic, scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale + offset
    q = quantize(x, bits, group, stochastic=stochastic, generator=g)
    assert q.packed.dtype == torch.uint8 and q.lo.dtype == torch.float32 and q.step.dtype == torch.float32
    assert int(q.clipped) == 0
    _check_bound(x, q, stochastic)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=40),
    bits=st.sampled_from(BITS),
    group=st.sampled_from(GROUPS),
)
def test_error_within_step_arbitrary_values(values, bits, group):
    x = torch.tensor(values, dtype=torch.float32)
    q = quantize(x, bits, group, stochastic=False)
    _check_bound(x, q, stochastic=False)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BITS), n=st.integers(0, 67), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=g)
    packed = pack_bits(codes, bits)
    assert packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 70), seed=st.integers(0, 2**31 - 1))
def test_mask_round_trip(n, seed):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.5
    packed = pack_mask(mask)
    assert packed.numel() == (n + 7) // 8
    out = unpack_mask(packed, (n,))
    assert out.dtype == torch.bool and torch.equal(out, mask)


def test_pack_layout_and_mask_shape():
    # First code in the low bits of the byte.
    assert pack_bits(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 2).tolist() == [0b111001]
    mask = torch.rand(3, 5, 7) > 0.3
    assert torch.equal(unpack_mask(pack_mask(mask), mask.shape), mask)
    with pytest.raises(ValueError, match="codes must be < 2"):
        pack_bits(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="numel"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 4, 5)


def test_chunked_path_matches_bound_and_packing(path):
    """Large enough for several CPU chunks, odd sizes so chunks and packing meet mid-byte only at the end."""
    if path == "triton":
        pytest.skip("CPU chunking; the Triton kernels' program boundaries: test_triton_program_boundaries")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1999, 257, generator=g)
    for bits in (8, 4, 2):
        for group in ("channel", 1000, "tensor"):
            q = quantize(x, bits, group, generator=g)
            _check_bound(x, q, stochastic=True)
    xh = torch.randn(4, 3, 1001, 129, generator=g)
    _check_bound(xh, quantize(xh, 4, "head", generator=g), stochastic=True)


@pytest.mark.parametrize("bits", BITS)
def test_stochastic_rounding_is_unbiased(bits, path):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 16, generator=g) * 3 - 1
    reps = 100 if path == "triton" else 400  # the interpreter is slow; the bounds below scale with reps
    total = torch.zeros_like(x)
    for _ in range(reps):
        q = quantize(x, bits, "channel", stochastic=True, generator=g)
        total += dequantize(q)
    mean = total / reps
    step = q.step.expand_as(x)
    # Per element the decoded value is one of two adjacent levels: std <= step / 2, so the mean's std <= step / 40.
    # Check the average bias over all elements (tight) and each element (loose: 6 sigma).
    assert float(((mean - x) / step).mean().abs()) < 0.01
    assert torch.all((mean - x).abs() <= 6 * step / (2 * reps**0.5))
    # Nearest rounding is deterministic and biased per element; stochastic must beat it on average.
    near = dequantize(quantize(x, bits, "channel", stochastic=False))
    assert float((mean - x).abs().mean()) < float((near - x).abs().mean())


def test_generator_makes_results_reproducible():
    x = torch.randn(10, 33)
    a = quantize(x, 4, "channel", generator=torch.Generator().manual_seed(5))
    b = quantize(x, 4, "channel", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.packed, b.packed)


@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_running_range_clamps_and_counts(bits, stochastic):
    x = torch.tensor([[-3.0, 0.0], [0.5, 0.9], [1.0, 5.0], [-0.5, 0.2]])
    lo, hi = torch.tensor([[-1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    q = quantize(x, bits, "channel", lo=lo, hi=hi, stochastic=stochastic)
    assert isinstance(q.clipped, torch.Tensor) and q.clipped.dim() == 0
    assert int(q.clipped) == 2  # -3 below column 0's range, 5 above column 1's; 1.0 and 0.0 are at the ends
    d = dequantize(q)
    assert d[0, 0] == pytest.approx(-1.0, abs=1e-6)  # clamped to lo, not wrapped
    assert d[2, 1] == pytest.approx(1.0, abs=1e-6)  # a value above hi decodes to hi, not to something small
    inside = torch.tensor([[False, True], [True, True], [True, False], [True, True]])
    step = q.step.expand_as(x)
    assert torch.all(((d - x).abs() <= step + 1e-6)[inside])


def test_running_range_is_snapshotted_and_broadcast():
    x = torch.randn(2, 3, 4, 5)
    lo, hi = torch.full((1, 3, 1, 1), -1.0), torch.full((1, 3, 1, 1), 1.0)
    q = quantize(x, 8, "head", lo=lo, hi=hi)
    lo.fill_(100.0)  # a later in-place update of the running range must not change q
    assert torch.all(q.lo == -1.0)
    q2 = quantize(x, 8, "head", lo=torch.tensor(-1.0), hi=torch.tensor(1.0))  # scalar broadcasts per head
    assert q2.lo.shape == (1, 3, 1, 1)
    with pytest.raises(ValueError, match="lo"):
        quantize(x, 8, "head", lo=torch.zeros(4), hi=torch.ones(4))
    with pytest.raises(ValueError, match="together"):
        quantize(x, 8, "head", lo=lo)


def test_ema_update():
    b1 = (torch.tensor([0.0, -2.0]), torch.tensor([1.0, 2.0]))
    r = ema_update(None, b1, 0.9)
    assert torch.equal(r[0], b1[0]) and torch.equal(r[1], b1[1])
    assert r[0] is not b1[0]
    b2 = (torch.tensor([-1.0, -2.0]), torch.tensor([3.0, 0.0]))
    r2 = ema_update(r, b2, 0.9)
    assert torch.allclose(r2[0], torch.tensor([-0.1, -2.0]))
    assert torch.allclose(r2[1], torch.tensor([1.2, 1.8]))
    assert torch.equal(r[0], b1[0])  # inputs untouched
    assert torch.equal(ema_update(r, b2, 1.0)[0], r[0]) and torch.equal(ema_update(r, b2, 0.0)[1], b2[1])
    with pytest.raises(ValueError, match="decay"):
        ema_update(r, b2, 1.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update(r, (torch.zeros(3), torch.zeros(3)), 0.9)


def test_group_shapes():
    x = torch.randn(2, 3, 5, 4)
    assert [t.shape for t in group_minmax(x, "head")] == [(1, 3, 1, 1)] * 2
    assert group_minmax(x, "channel")[0].shape == (1, 1, 1, 4)
    assert group_minmax(x, "tensor")[0].shape == ()
    assert group_minmax(x, 7)[0].shape == (18, 1)  # ceil(120 / 7)
    y = torch.randn(6, 8)
    assert group_minmax(y, "head")[0].shape == (1, 8)  # non-4-D falls back to channel
    lo, hi = group_minmax(x, "head")
    assert torch.equal(lo.view(3), x.amin(dim=(0, 2, 3))) and torch.equal(hi.view(3), x.amax(dim=(0, 2, 3)))
    lo, hi = group_minmax(torch.arange(10.0), 4)  # last group short: padding must not change its stats
    assert lo.view(-1).tolist() == [0, 4, 8] and hi.view(-1).tolist() == [3, 7, 9]
    assert group_reduce_dims(x.shape, "head") == (0, 2, 3)
    assert group_reduce_dims(x.shape, "channel") == (0, 1, 2)
    assert group_reduce_dims(x.shape, 16) == (1,)
    for group in ("head", "channel", "tensor", 7):
        q = quantize(x, 4, group)
        assert q.lo.shape == q.step.shape == group_minmax(x, group)[0].shape
        assert dequantize(q).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group", ["head", "channel", "tensor", 16])
def test_dtype_preserved(dtype, group):
    x = torch.randn(2, 3, 4, 8).to(dtype)
    q = quantize(x, 8, group)
    assert q.dtype == dtype and q.lo.dtype == torch.float32
    d = dequantize(q)
    assert d.dtype == dtype and d.is_contiguous() and d.shape == x.shape
    # Decoding rounds lo + code * step to the output dtype: half a unit in its last place on top of the step bound.
    rel = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    err = (d.float() - x.float()).abs()
    assert torch.all(err <= _expand_step(q, x) * 1.001 + rel * x.float().abs() + 1e-6)


def test_nbytes_fraction(path):
    if path == "triton":
        pytest.skip("sizes are set by quantize() itself, whatever kernel fills them")
    x = torch.randn(64, 128, 96)
    assert quantize(x, 8, "channel").nbytes() / x.nbytes == pytest.approx(0.25, abs=0.002)
    assert quantize(x, 4, "channel").nbytes() / x.nbytes == pytest.approx(0.125, abs=0.002)
    assert quantize(x, 2, 256).nbytes() / x.nbytes == pytest.approx(0.0625 + 8 / 256 / 4, abs=0.002)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("stochastic", [True, False])
def test_constant_tensor_round_trips_exactly(bits, stochastic):
    x = torch.full((4, 6), 3.25)
    d = dequantize(quantize(x, bits, "channel", stochastic=stochastic))
    assert torch.equal(d, x)
    z = torch.zeros(2, 2, 3, 3, dtype=torch.bfloat16)
    assert torch.equal(dequantize(quantize(z, bits, "head")), z)


@pytest.mark.parametrize("bits", BITS)
def test_huge_values(bits):
    x = torch.tensor([[1e30, -1e30, 0.0, 5e29], [-1e30, 1e30, 1e29, -3e29]])
    for group in ("tensor", "channel", 3):
        q = quantize(x, bits, group)
        d = dequantize(q)
        assert torch.isfinite(d).all()
        _check_bound(x, q, stochastic=True)


@pytest.mark.parametrize("bits", BITS)
def test_subnormal_values(bits):
    x = torch.tensor([1e-40, 2e-40, 0.0, -1e-40, 3e-41, 1e-45])
    for group in ("tensor", "channel", 2):
        d = dequantize(quantize(x, bits, group))
        assert not torch.isnan(d).any()
        assert float((d - x).abs().max()) <= 1e-38  # within one (clamped, smallest normal) step


def test_non_finite_groups_are_reported_and_isolated():
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    x[0, 3] = float("inf")
    lo, hi = group_minmax(x, "channel")
    assert torch.isnan(lo[0, 2]) and torch.isinf(hi[0, 3])
    assert not ranges_are_finite(lo, hi)
    assert ranges_are_finite(*group_minmax(x[:, :2], "channel"))
    assert not ranges_are_finite(torch.tensor([-3e38]), torch.tensor([3e38]))  # range overflows fp32
    for bits in BITS:
        q = quantize(x, bits, "channel")
        d = dequantize(q)
        good = x[:, :2]
        assert torch.all((d[:, :2] - good).abs() <= q.step[:, :2] + 1e-6)  # other groups unaffected


def test_bad_arguments():
    x = torch.randn(4, 4)
    for bits in (1, 3, 16, True):
        with pytest.raises(ValueError, match=r"bits must be one of \(8, 4, 2\)"):
            quantize(x, bits, "channel")
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(3, dtype=torch.uint8), 5)
    for group in ("row", 0, -4, 2.5, True, None):
        with pytest.raises(ValueError, match="group"):
            quantize(x, 8, group)
        with pytest.raises(ValueError, match="group"):
            group_minmax(x, group)
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.arange(4), 8, "tensor")


def test_empty_and_scalar_tensors():
    e = torch.empty(0, 5)
    assert dequantize(quantize(e, 4, "channel")).shape == (0, 5)
    s = torch.tensor(2.5)
    assert torch.equal(dequantize(quantize(s, 4, "channel")), s)
    v = torch.tensor([1.0, -2.0, 7.0])  # 1-D channel groups: every element its own group, exact
    assert torch.equal(dequantize(quantize(v, 2, "channel")), v)


def test_noise_pool_rounding_is_unbiased(path):
    if path == "triton":
        pytest.skip("the fused kernels draw their own noise (test_stochastic_rounding_is_unbiased)")
    generator = torch.Generator().manual_seed(0)
    pool = make_noise_pool(generator=generator, size=4096)
    assert float(pool.min()) >= -0.5 and float(pool.max()) < 0.5
    x = torch.linspace(-1.0, 1.0, 257).view(1, -1)
    lo, hi = torch.tensor(-1.0), torch.tensor(1.0)
    decoded = torch.stack([
        dequantize(quantize(x, 2, "tensor", lo=lo, hi=hi, generator=generator, noise_pool=pool)) for _ in range(600)
    ])
    step = 2.0 / 3
    assert (decoded - x).abs().max() <= step + 1e-6
    assert (decoded.mean(0) - x).abs().max() < 0.06 * step * 3  # 600 draws: standard error <= 0.02 step
    nearest = dequantize(quantize(x, 2, "tensor", lo=lo, hi=hi, stochastic=False))
    assert (decoded.mean(0) - x).abs().mean() < (nearest - x).abs().mean() / 3


def test_native_kernels_are_built(path):
    """On a machine with a C++ compiler the fast path must build (set LEANFORMER_NATIVE=0 to run without it)."""
    if path == "native":
        assert _native.kernels(KERNEL_SOURCE) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", ["head", "channel", "tensor", 64, 7])
@pytest.mark.parametrize("bits", BITS)
def test_fused_kernels_match_reference(bits, group, dtype, path):
    """Same statistics, same codes with nearest rounding, same decoding (up to one ulp from fused multiply-add)."""
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(3, 4, 37, 29, generator=g) * 3 + 1).to(dtype)
    lo, hi = group_minmax(x, group)
    ref_lo, ref_hi = _reference(lambda: group_minmax(x, group))
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)
    q = quantize(x, bits, group, stochastic=False)
    ref_q = _reference(lambda: quantize(x, bits, group, stochastic=False))
    real_codes = x.numel() * bits // 8  # int group sizes pad the last group; padding codes may differ
    assert torch.equal(q.packed[:real_codes], ref_q.packed[:real_codes])
    out, ref_out = dequantize(q), _reference(lambda: dequantize(q))
    assert out.dtype == ref_out.dtype == dtype
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=1e-2 if dtype != torch.float32 else 1e-6, atol=1e-6)


def test_fused_kernels_match_reference_on_running_ranges_and_non_finite(path):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 3, 64, generator=g)
    lo, hi = group_minmax(x, "channel")
    run = (lo * 0.5, hi * 0.5)
    q = quantize(x, 4, "channel", lo=run[0], hi=run[1], stochastic=False)
    ref_q = _reference(lambda: quantize(x, 4, "channel", lo=run[0], hi=run[1], stochastic=False))
    assert int(q.clipped) == int(ref_q.clipped) > 0
    assert torch.equal(q.packed, ref_q.packed)
    x[7, 1, 5] = float("nan")
    x[9, 2, 6] = float("inf")
    stats = group_minmax(x, "channel")
    ref_stats = _reference(lambda: group_minmax(x, "channel"))
    for a, b in zip(stats, ref_stats, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("group", ["channel", "head", "tensor", 1000])
@pytest.mark.parametrize("bits", BITS)
def test_triton_program_boundaries(bits, group, path):
    """Sizes that cross the Triton kernels' program boundaries (several row parts, column blocks, byte blocks) and
    end mid-byte: statistics and nearest-rounded codes equal the reference's, stochastic codes stay within a step."""
    if path != "triton":
        pytest.skip("the Triton kernels' own block boundaries")
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 117, 71, generator=g) * 2 - 0.5  # channel: 1755 rows x 71 cols; head: 5 heads
    lo, hi = group_minmax(x, group)
    ref_lo, ref_hi = _reference(lambda: group_minmax(x, group))
    assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)
    q = quantize(x, bits, group, stochastic=False)
    ref_q = _reference(lambda: quantize(x, bits, group, stochastic=False))
    real_codes = x.numel() * bits // 8
    assert torch.equal(q.packed[:real_codes], ref_q.packed[:real_codes])
    torch.testing.assert_close(dequantize(q), _reference(lambda: dequantize(q)), rtol=1e-6, atol=1e-6)
    _check_bound(x, quantize(x, bits, group, generator=g), stochastic=True)
