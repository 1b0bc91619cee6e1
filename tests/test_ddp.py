"""NNDMNetwork under DistributedDataParallel, wrapped as nnU-Net wraps it (no find_unused_parameters), on two
CPU processes with the gloo backend: every NNDM stage must run several iterations without DDP's
"parameters that were not used in producing loss" error, and gradients must agree across ranks.
(nnU-Net's own multi-GPU path asserts CUDA; this checks the part that is ours.)"""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_nndm_network import make_network


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net = make_network(seed=0).train()
    net.decoder.deep_supervision = True
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    torch.manual_seed(100 + rank)  # different data per rank
    norms = []
    for train_backbone, train_refiner in ((True, False), (False, True), (True, True)):
        for _ in range(2):
            x = torch.randn(1, 4, 16, 16, 16)
            y = torch.randint(0, 2, (1, 3, 16, 16, 16)).float()
            ddp.zero_grad(set_to_none=True)
            out, l_diff, zero = ddp(x, y=y, train_backbone=train_backbone, train_refiner=train_refiner,
                                  tie_frozen=True)
            loss = zero + (sum(o.float().mean() for o in out) if train_backbone else 0) + \
                (l_diff if train_refiner else 0)
            loss.backward()
            norms.append(torch.stack([p.grad.norm() for p in net.parameters()]))
    torch.save(torch.stack(norms), os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_all_stages_run_under_ddp_and_gradients_are_synchronised(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    g0, g1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert g0.shape[0] == 6
    assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-7)  # all-reduced: identical on both ranks
    assert (g0.sum(1) > 0).all()


def _recoseg_worker(rank, world, port, result_dir):
    from test_recoseg import _network
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    net = _network().train()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    torch.manual_seed(100 + rank)
    norms = []
    for stage in (1, 1, 2, 2):  # synthesis (segmenter unused), segmentation on images + residual (synthesiser unused)
        ddp.zero_grad(set_to_none=True)
        if stage == 1:
            loss = ddp(torch.randn(1, 4, 8, 8, 8), mode="synthesis_loss", tie_frozen=True)
        else:
            out, zero = ddp(torch.randn(1, 5, 8, 8, 8), mode="segment", tie_frozen=True)
            loss = out.float().mean() + zero
        loss.backward()
        norms.append(torch.stack([p.grad.norm() for p in net.parameters()]))
    torch.save(torch.stack(norms), os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_recoseg_stages_run_under_ddp(tmp_path):
    mp.spawn(_recoseg_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    g0, g1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert g0.shape[0] == 4 and torch.allclose(g0, g1, rtol=1e-4, atol=1e-7)
