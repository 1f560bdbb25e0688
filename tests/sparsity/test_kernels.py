"""Row-sparse products: compiled kernels and the PyTorch path both equal the dense product on the rows chosen."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leanformer import _native
from leanformer.sparsity.kernels import (
    KERNEL_SOURCE,
    backend,
    gated_down,
    gather_matmul,
    input_sparse_down,
    scatter_matmul,
)


@pytest.fixture(autouse=True, params=["native", "reference"])
def path(request, monkeypatch):
    """Run each test on the compiled kernels and on the PyTorch path."""
    monkeypatch.setenv("LEANFORMER_NATIVE", "1" if request.param == "native" else "0")
    return request.param


def test_native_kernels_are_built_and_chosen(path):
    x, w = torch.randn(2, 8), torch.randn(5, 8)
    with torch.no_grad():
        assert backend(x, w) == ("native" if path == "native" else "torch")
    if path == "native":
        assert _native.kernels(KERNEL_SOURCE) is not None


def test_backend_falls_back_for_autograd_and_other_dtypes():
    w = torch.randn(5, 8, requires_grad=True)
    assert backend(torch.randn(2, 8), w) == "torch"
    with torch.no_grad():
        assert backend(torch.randn(2, 8, dtype=torch.bfloat16), w.detach().bfloat16()) == "torch"


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 9), d=st.integers(1, 70), rows=st.integers(1, 90), out=st.integers(1, 140),
       data=st.data())
def test_products_equal_dense_on_the_selected_rows(batch, d, rows, out, data):
    k = data.draw(st.integers(0, rows))
    index = torch.tensor(sorted(data.draw(st.permutations(range(rows)))[:k]), dtype=torch.long)
    g = torch.Generator().manual_seed(batch * 1000 + d)
    x, w = torch.randn(batch, d, generator=g), torch.randn(rows, d, generator=g)
    h, wt = torch.randn(batch, k, generator=g), torch.randn(rows, out, generator=g)
    h[h < -0.5] = 0  # units active for some tokens of the batch only
    with torch.no_grad():
        torch.testing.assert_close(gather_matmul(x, w, index), x @ w[index].T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scatter_matmul(h, wt, index), h @ wt[index], atol=1e-5, rtol=1e-5)


def test_unsorted_and_repeated_indices_follow_the_definition():
    x, w, wt = torch.randn(3, 16), torch.randn(10, 16), torch.randn(10, 24)
    index = torch.tensor([7, 2, 7, 0])
    h = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(gather_matmul(x, w, index), x @ w[index].T)
        torch.testing.assert_close(scatter_matmul(h, wt, index), h @ wt[index])


def test_torch_path_keeps_gradients():
    x, w = torch.randn(2, 6), torch.randn(9, 6, requires_grad=True)
    index = torch.tensor([1, 4])
    gather_matmul(x, w, index).sum().backward()
    assert torch.equal(w.grad[[0, 2, 3, 5, 6, 7, 8]], torch.zeros(7, 6))
    torch.testing.assert_close(w.grad[[1, 4]], x.sum(0).expand(2, 6))


def test_bad_inputs_are_refused():
    x, w = torch.randn(2, 6), torch.randn(9, 6)
    with torch.no_grad():
        with pytest.raises(ValueError, match="index must be int64"):
            gather_matmul(x, w, torch.tensor([1, 2], dtype=torch.int32))
        with pytest.raises(ValueError, match="expected 2-D"):
            gather_matmul(x[0], w, torch.tensor([1]))
        with pytest.raises(ValueError, match="h has 3 columns for 2 indices"):
            scatter_matmul(torch.randn(2, 3), w, torch.tensor([1, 2]))
        with pytest.raises((RuntimeError, IndexError), match="out of range"):
            gather_matmul(x, w, torch.tensor([9]))


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 6), d=st.integers(1, 40), n=st.integers(1, 80), m=st.integers(1, 70),
       zeros=st.floats(0.0, 1.0), bias=st.booleans())
def test_fused_tails_equal_the_dense_ffn_and_count_the_union(batch, d, n, m, zeros, bias):
    g = torch.Generator().manual_seed(batch * 7919 + d * 31 + n)
    x, w_up, w_t = torch.randn(batch, d, generator=g), torch.randn(n, d, generator=g), torch.randn(n, m, generator=g)
    b_up = torch.randn(n, generator=g) if bias else None
    a = torch.randn(batch, n, generator=g)
    a[torch.rand(batch, n, generator=g) < zeros] = 0
    union = int((a != 0).any(0).sum())
    up = x @ w_up.T + (b_up if bias else 0)
    with torch.no_grad():
        out, count, _ = gated_down(x, a, w_up, b_up, w_t, n)
        assert count == union
        torch.testing.assert_close(out, (a * up) @ w_t, atol=1e-4, rtol=1e-4)
        out, count, _ = input_sparse_down(a, w_t, n)
        assert count == union
        torch.testing.assert_close(out, a @ w_t, atol=1e-4, rtol=1e-4)
        if union > 0:  # one unit too many: refused, nothing computed
            assert gated_down(x, a, w_up, b_up, w_t, union - 1)[:2] == (None, union)
            assert input_sparse_down(a, w_t, union - 1)[:2] == (None, union)


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_fused_threshold_equals_applying_the_activation_first(threshold):
    g = torch.Generator().manual_seed(3)
    x, w_up, w_t = torch.randn(3, 16, generator=g), torch.randn(40, 16, generator=g), torch.randn(40, 24, generator=g)
    pre = torch.randn(3, 40, generator=g)
    pre[0, :5] = threshold  # exactly at the threshold: kept, as FATReLU keeps x >= t
    activated = pre.masked_fill(pre < threshold, 0)
    with torch.no_grad():
        fused, count, _ = gated_down(x, pre, w_up, None, w_t, 40, threshold)
        unfused, unfused_count, _ = gated_down(x, activated, w_up, None, w_t, 40)
    assert count == unfused_count == int((activated != 0).any(0).sum())
    torch.testing.assert_close(fused, unfused)
