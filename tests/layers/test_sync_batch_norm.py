"""Synchronized BatchNorm over 2 gloo processes equals single-process BatchNorm on the concatenated batch."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normlab
from tests.helpers import randomize_weight_and_bias

C = 3
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _worker(rank, port, sizes, spatial, steps, errfile):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        torch.set_num_threads(1)
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
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # surface the child's failure in the parent
        with open(errfile, "a") as f:
            f.write(f"rank {rank}: {type(e).__name__}: {e}\n")
        raise


@pytest.mark.slow
@pytest.mark.parametrize("sizes,spatial", [((3, 5), (2, 3)), ((1, 4), (1, 1))])
def test_sync_equals_single_process_on_concatenated_batch(sizes, spatial):
    with tempfile.TemporaryDirectory() as d:
        errfile = os.path.join(d, "err")
        try:
            mp.spawn(_worker, args=(_free_port(), sizes, spatial, 3, errfile), nprocs=WORLD, join=True)
        except Exception:
            with open(errfile) as f:
                pytest.fail(f.read())
