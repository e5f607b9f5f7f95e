"""decode_linear (the decode-step linear kernel) against a float64 reference:
awkward sizes, bias or none, strided inputs, every row count it takes, NaN
rows, thread counts, and the inputs it refuses."""
import pytest
import torch
import torch.nn.functional as F

from rlhf_engine import _native
from rlhf_engine.ops import decode_linear as dl
from tests.helpers import assert_close, fresh_generator, poisoned_outputs

pytestmark = pytest.mark.skipif(_native.CPU_ERROR is not None, reason=str(_native.CPU_ERROR))
U = 2.0**-24  # float32 unit roundoff


def reference(x, weight, bias):
    out = x.double() @ weight.double().t()
    return out if bias is None else out + bias.double()


def assert_within_summation_bound(out, x, weight, bias):
    """Element by element, within the float32 summation error bound
    K u (|x| @ |w|.T + |b|) (a dropped or repeated term is far outside it)."""
    magnitude = x.double().abs() @ weight.double().abs().t() + (0 if bias is None else bias.double().abs())
    bound = (x.shape[-1] + 2) * U * magnitude + 1e-30
    err = (out.double() - reference(x, weight, bias)).abs()
    assert (err <= bound).all(), f"max error / bound {(err / bound).max().item():.2f}"


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 16])
@pytest.mark.parametrize("k,n", [(1, 5), (7, 3), (33, 100), (515, 257), (1536, 64)])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matches_float64(rows, k, n, with_bias):
    gen = fresh_generator()
    x = torch.randn(rows, k, generator=gen)
    weight = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen) if with_bias else None
    with torch.no_grad(), poisoned_outputs():
        out = dl.decode_linear(x, weight, bias)
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    assert_close(out, reference(x, weight, bias), 1e-6)
    assert_within_summation_bound(out, x, weight, bias)


def test_leading_dims_and_strides():
    """x [B, 1, K] as a decode step passes it, a column slice of a wider
    weight (row stride > K), a transposed (non-unit K stride) x."""
    gen = fresh_generator()
    x = torch.randn(3, 1, 40, generator=gen)
    wide = torch.randn(70, 45, generator=gen)
    weight = wide[:, 2:42]
    bias = torch.randn(70, generator=gen)
    with torch.no_grad():
        out = dl.decode_linear(x, weight, bias)
        assert out.shape == (3, 1, 70)
        assert_close(out, reference(x, weight, bias), 1e-6)
        xt = torch.randn(40, 5, generator=gen).t()  # stride along K is 5
        assert_close(dl.decode_linear(xt, weight, bias), reference(xt, weight, bias), 1e-6)


def test_bitwise_same_at_any_thread_count():
    gen = fresh_generator()
    x, weight = torch.randn(8, 512, generator=gen), torch.randn(1536, 512, generator=gen)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = dl.decode_linear(x, weight)
            torch.set_num_threads(2)
            two = dl.decode_linear(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_non_finite_rows_stay_in_their_rows():
    gen = fresh_generator()
    x, weight = torch.randn(4, 64, generator=gen), torch.randn(32, 64, generator=gen)
    x[1, 5] = float("nan")
    x[2, 0] = float("inf")
    with torch.no_grad():
        out = dl.decode_linear(x, weight)
    assert torch.isnan(out[1]).all()
    assert not torch.isfinite(out[2]).any()
    assert torch.isfinite(out[[0, 3]]).all()
    assert_close(out[[0, 3]], reference(x[[0, 3]], weight, None), 1e-6)


def test_empty_sizes():
    with torch.no_grad():
        assert dl.decode_linear(torch.randn(0, 8), torch.randn(5, 8)).shape == (0, 5)
        bias = torch.randn(5)
        assert torch.equal(dl.decode_linear(torch.randn(2, 0), torch.randn(5, 0), bias), bias.expand(2, 5))


@pytest.mark.parametrize("case", ["grad_mode", "bfloat16", "too_many_rows", "shape", "weight_stride"])
def test_refuses_what_it_does_not_run(case):
    x, weight = torch.randn(4, 16), torch.randn(8, 16)
    grad = case == "grad_mode"
    if case == "bfloat16":
        x = x.bfloat16()
    elif case == "too_many_rows":
        x = torch.randn(dl.MAX_ROWS + 1, 16)
    elif case == "shape":
        weight = torch.randn(8, 15)
    elif case == "weight_stride":
        weight = torch.randn(16, 8).t()
    with torch.set_grad_enabled(grad):
        assert not dl.applies(x, weight)
        with pytest.raises(ValueError, match="decode_linear takes"):
            dl.decode_linear(x, weight)


def test_linear_falls_back_to_f_linear_exactly():
    """Where the kernel does not apply, ``linear`` is F.linear itself."""
    gen = fresh_generator()
    x, weight, bias = torch.randn(dl.MAX_ROWS + 3, 24, generator=gen), torch.randn(9, 24, generator=gen), None
    with torch.no_grad():
        assert torch.equal(dl.linear(x, weight, bias), F.linear(x, weight, bias))
        small = x[:4]
        assert_close(dl.linear(small, weight, bias), reference(small, weight, bias), 1e-6)
    leaf = x[:2].clone().requires_grad_()
    out = dl.linear(leaf, weight)  # grad mode on: F.linear, differentiable
    out.sum().backward()
    assert_close(leaf.grad, weight.double().sum(0).expand(2, -1), 1e-6, "gradient")
