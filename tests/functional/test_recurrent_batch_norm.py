"""recurrent_batch_norm against torch's batch norm applied with one row of per-step buffers, and closed forms."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from normlab.functional import batch_norm, recurrent_batch_norm
from tests.helpers import assert_all_close, forward_backward, seeded_randn
from tests.tolerances import assert_close

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _buffers(max_steps, c, dtype=torch.float32):
    mean = torch.randn(max_steps, c, dtype=dtype)
    var = torch.rand(max_steps, c, dtype=dtype) + 0.5
    return mean, var


def _affine(c, dtype=torch.float32):
    return torch.empty(c, dtype=dtype).uniform_(0.5, 1.5), torch.empty(c, dtype=dtype).uniform_(-0.5, 0.5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("step,slot", [(0, 0), (2, 2), (3, 3), (4, 3), (17, 3)])
def test_matches_torch_batch_norm_on_the_step_row(training, step, slot):
    x = torch.randn(6, 5) * 3 + 2
    weight, bias = _affine(5)
    ours_mean, ours_var = _buffers(4, 5)
    ref_mean, ref_var = ours_mean[slot].clone(), ours_var[slot].clone()
    untouched = [r for r in range(4) if r != slot]
    before = ours_mean[untouched].clone(), ours_var[untouched].clone()

    def ours(x, w, b):
        return recurrent_batch_norm(x, step, ours_mean, ours_var, w, b, training, 0.2, 1e-4)

    def ref(x, w, b):
        return F.batch_norm(x, ref_mean, ref_var, w, b, training, 0.2, 1e-4)

    assert_all_close(forward_backward(ours, x, weight, bias), forward_backward(ref, x, weight, bias))
    assert_close(ours_mean[slot], ref_mean)
    assert_close(ours_var[slot], ref_var)
    # every other step's statistics are left alone
    assert torch.equal(ours_mean[untouched], before[0]) and torch.equal(ours_var[untouched], before[1])


def test_training_records_each_step_in_its_own_row():
    mean, var = torch.zeros(3, 2), torch.ones(3, 2)
    for step in range(3):
        x = torch.randn(64, 2) * (step + 1) + 10 * step
        recurrent_batch_norm(x, step, mean, var, training=True, momentum=1.0)
        assert_close(mean[step], x.mean(0))
        assert_close(var[step], x.var(0))
    assert not torch.allclose(mean[0], mean[2]) and not torch.allclose(var[0], var[2])


def test_eval_uses_the_step_row_and_the_last_row_beyond_max_steps():
    mean, var = _buffers(3, 4)
    x = torch.randn(5, 4)
    for step, slot in [(0, 0), (1, 1), (2, 2), (3, 2), (50, 2)]:
        y = recurrent_batch_norm(x, step, mean, var, training=False)
        assert_close(y, (x - mean[slot]) / torch.sqrt(var[slot] + 1e-5))


def test_without_running_stats_is_plain_batch_norm():
    x, (weight, bias) = torch.randn(7, 3) * 2 + 1, _affine(3)
    for training in (True, False):
        assert_close(
            recurrent_batch_norm(x, 5, None, None, weight, bias, training), batch_norm(x, None, None, weight, bias)
        )


@given(
    n=st.sampled_from([2, 3, 7, 13, 64]),
    c=st.sampled_from([1, 5, 12]),
    step=st.integers(0, 6),
    dtype=st.sampled_from(DTYPES),
)
def test_training_output_is_standardized_per_feature(n, c, step, dtype):
    x = (seeded_randn((n, c), torch.float64) * 3 + 2).to(dtype)
    mean, var = torch.zeros(4, c, dtype=dtype), torch.ones(4, c, dtype=dtype)
    y = recurrent_batch_norm(x, step, mean, var, training=True, eps=1e-12).double()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    assert y.mean(0).abs().max() < tol
    assert (y.var(0, correction=0) - 1).abs().max() < 10 * tol


@pytest.mark.parametrize(
    "dtype,offset", [(torch.float32, 1e4), (torch.bfloat16, 100.0)], ids=["float32_mean1e4", "bfloat16_mean100"]
)
def test_large_offset_normalizes(dtype, offset):
    x = (torch.randn(256, 6, dtype=torch.float64) + offset).to(dtype)
    mean, var = torch.zeros(2, 6), torch.ones(2, 6)
    y = recurrent_batch_norm(x, 1, mean, var, training=True, momentum=1.0).float()
    assert y.mean(0).abs().max() < 1e-2
    assert (y.std(0, correction=0) - 1).abs().max() < 1e-2
    assert (mean[1] - offset).abs().max() < 0.5 and (var[1] - 1).abs().max() < 0.3  # step 1's row holds the data's


def test_output_dtype_is_the_input_dtype():
    for dtype in DTYPES:
        mean, var = torch.zeros(2, 3), torch.ones(2, 3)
        assert recurrent_batch_norm(torch.randn(4, 3, dtype=dtype), 0, mean, var, training=True).dtype == dtype


@pytest.mark.parametrize("bad", [-1, 1.0, True, torch.tensor(1), None])
def test_step_must_be_a_non_negative_int(bad):
    mean, var = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"recurrent_batch_norm: step=.* must be a non-negative Python int"):
        recurrent_batch_norm(torch.randn(4, 3), bad, mean, var)


def test_batch_of_one_in_training_raises():
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\(1, 3\)"):
        recurrent_batch_norm(torch.randn(1, 3), 0, torch.zeros(2, 3), torch.ones(2, 3), training=True)
