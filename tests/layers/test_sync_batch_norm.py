"""Synchronized BatchNorm over 2 gloo processes equals single-process BatchNorm on the concatenated batch."""

import pytest
import torch
import torch.distributed as dist

import normlab
from tests.distributed import run_ranks
from tests.helpers import randomize_weight_and_bias

C = 3


def _reference(sizes, spatial, steps):
    """Single-process torch BatchNorm on the concatenated batches: outputs, input grads, param grads, stats."""
    torch.manual_seed(1)
    bn = randomize_weight_and_bias(torch.nn.BatchNorm2d(C, momentum=None))
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    results = []
    for step in range(steps):
        xs = [torch.randn(n, C, *spatial) * (r + 1) + step for r, n in enumerate(sizes)]
        gs = [torch.randn(n, C, *spatial) for n in sizes]
        x = torch.cat(xs).requires_grad_()
        bn.zero_grad()
        y = bn(x)
        (y * torch.cat(gs)).sum().backward()
        results.append(
            (
                xs,
                gs,
                y.detach().split(sizes),
                x.grad.split(sizes),
                bn.weight.grad.clone(),
                bn.bias.grad.clone(),
                bn.running_mean.clone(),
                bn.running_var.clone(),
            )
        )
    return state, results


def _check_rank(rank, sizes, spatial, steps):
    state, results = _reference(sizes, spatial, steps)
    bn = normlab.BatchNorm2d(C, momentum=None, sync=True)
    bn.load_state_dict(state)
    for xs, gs, y_ref, gx_ref, gw_ref, gb_ref, rm_ref, rv_ref in results:
        bn.zero_grad()
        x = xs[rank].clone().requires_grad_()
        y = bn(x)
        (y * gs[rank]).sum().backward()
        gw, gb = bn.weight.grad.clone(), bn.bias.grad.clone()
        dist.all_reduce(gw)  # what DDP does with parameter gradients
        dist.all_reduce(gb)
        torch.testing.assert_close(y, y_ref[rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, gx_ref[rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gb, gb_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_mean, rm_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var, rv_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("sizes,spatial", [((3, 5), (2, 3)), ((1, 4), (1, 1))])
def test_sync_equals_single_process_on_concatenated_batch(sizes, spatial):
    run_ranks(_check_rank, sizes, spatial, 3)
