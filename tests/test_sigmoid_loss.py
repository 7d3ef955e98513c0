"""The SigLIP sigmoid loss against a plain double-loop reference, forward and backward,
with duplicate texts, and under 2-process DDP (gloo) against the 1-process loss."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import servers
from vlmpipe.models.siglip.loss import SigmoidLoss


def reference_loss(img, txt, ids, log_t, b):
    """-1/n sum_i sum_j log sigmoid(z_ij (t <x_i, y_j> + b)), z_ij = +1 iff texts i and j are identical."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if ids[i] == ids[j] else -1.0
            logit = torch.exp(log_t) * torch.dot(img[i], txt[j]) + b
            total = total + torch.log(1.0 / (1.0 + torch.exp(-z * logit)))
    return -total / n


def _inputs(n=7, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    ids = torch.tensor([0, 1, 2, 1, 3, 0, 1][:n])  # texts 0 and 1 repeat: several positives per row
    return img, txt, ids


def test_initialisation():
    loss = SigmoidLoss()
    assert loss.log_temperature.item() == pytest.approx(math.log(10))
    assert loss.bias.item() == pytest.approx(-10.0)


@pytest.mark.parametrize("trained", [False, True])
def test_forward_and_backward_match_double_loop(trained):
    img, txt, ids = _inputs()
    mod = SigmoidLoss().double()
    if trained:  # away from the init, where the sigmoid is saturated
        with torch.no_grad():
            mod.log_temperature.fill_(1.3)
            mod.bias.fill_(-0.7)
    a_img, a_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    got = mod(a_img, a_txt, ids)
    got.backward()

    r_img, r_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    r_t = mod.log_temperature.detach().clone().requires_grad_()
    r_b = mod.bias.detach().clone().requires_grad_()
    want = reference_loss(r_img, r_txt, ids.tolist(), r_t, r_b)
    want.backward()

    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a_img.grad, r_img.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a_txt.grad, r_txt.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mod.log_temperature.grad, r_t.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mod.bias.grad, r_b.grad, rtol=1e-9, atol=1e-12)


def test_duplicate_texts_are_positives_not_negatives():
    img, txt, ids = _inputs()
    mod = SigmoidLoss().double()
    with torch.no_grad():
        mod.log_temperature.fill_(0.0)
        mod.bias.fill_(0.0)
    diagonal_only = torch.arange(len(ids))  # what a diagonal-label loss would assume
    assert not torch.isclose(mod(img, txt, ids), mod(img, txt, diagonal_only))
    # Making image 3 (text 1) align with text row 1 (same text, another image) must lower the loss.
    better = img.clone()
    better[3] = txt[1]
    assert mod(better, txt, ids) < mod(img, txt, ids)


def test_normalised_by_number_of_images():
    img, txt, ids = _inputs()
    mod = SigmoidLoss().double()
    doubled = mod(torch.cat([img, img]), torch.cat([txt, txt]), torch.cat([ids, ids]))
    # Twice the images, each now against twice the texts: per-image sums double, the mean keeps that.
    torch.testing.assert_close(doubled, 2 * mod(img, txt, ids))


def _ddp_worker(rank, world, port, img, txt, ids, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = img.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        mod = SigmoidLoss().double()
        with torch.no_grad():
            mod.log_temperature.fill_(1.1)
            mod.bias.fill_(-1.5)
        x, y = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_()
        loss = mod(x, y, ids[sl])
        loss.backward()
        # DDP averages parameter gradients over ranks; do it by hand for the loss's scalars.
        g = torch.stack([mod.log_temperature.grad, mod.bias.grad])
        dist.all_reduce(g)
        # numpy, not tensors: a tensor crosses the queue as shared memory that dies with this process
        queue.put((rank, loss.item(), x.grad.numpy(), y.grad.numpy(), (g / world).numpy()))
    finally:
        dist.destroy_process_group()


def test_ddp_negatives_from_every_rank_match_one_process():
    """2 ranks x 4 pairs == 1 process x 8 pairs: loss (mean over ranks) and every gradient.

    The gradient of the global loss L = mean_r L_r w.r.t. a rank's embeddings is
    (1/W) * that rank's autograd gradient (DDP's 1/W comes from averaging)."""
    world = 2
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=-1)
    ids = torch.tensor([0, 1, 2, 3, 1, 4, 0, 5])  # duplicates across the two ranks

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = servers.free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, world, port, img, txt, ids, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    mod = SigmoidLoss().double()
    with torch.no_grad():
        mod.log_temperature.fill_(1.1)
        mod.bias.fill_(-1.5)
    x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
    full = mod(x, y, ids)
    full.backward()

    torch.testing.assert_close(sum(r[1] for r in results) / world, full.item(), rtol=1e-12, atol=1e-12)
    gx = torch.cat([torch.from_numpy(r[2]) for r in results]) / world
    gy = torch.cat([torch.from_numpy(r[3]) for r in results]) / world
    torch.testing.assert_close(gx, x.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gy, y.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.from_numpy(results[0][4]), torch.stack([mod.log_temperature.grad, mod.bias.grad]),
                               rtol=1e-10, atol=1e-12)
