"""The staged trainers' nnU-Net parts train with nnU-Net's own optimiser and PolyLRScheduler."""
import pytest
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_diffusion.trainers.lr_schedules import poly_lr


@pytest.mark.parametrize("lr0,total", [(1e-2, 7), (3e-4, 1), (0.5, 40)])
def test_poly_lr_follows_nnunets_poly_scheduler_step_by_step(lr0, total):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr0)
    nnunet = PolyLRScheduler(optimizer, lr0, total)
    for step in range(total):
        nnunet.step(step)
        assert poly_lr(lr0, step, total) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)


def test_poly_lr_of_an_empty_stage_is_not_a_division_by_zero():
    assert poly_lr(0.01, 0, 0) == 0.01


def test_nnunet_sgd_is_the_optimiser_nnunet_configures():
    """NNDM's backbone and ReCoSeg's segmenter: nnUNetTrainer.configure_optimizers' SGD, hyper-parameter for
    hyper-parameter (called unbound on a minimal trainer: it reads network, initial_lr, weight_decay, num_epochs)."""
    from types import SimpleNamespace

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_diffusion.trainers.base import ConfiguredTrainer
    net = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(network=net, initial_lr=3e-3, weight_decay=7e-5, num_epochs=10)
    stock, _ = nnUNetTrainer.configure_optimizers(trainer)
    ours = ConfiguredTrainer.nnunet_sgd(trainer, net.parameters())
    assert type(ours) is type(stock) and ours.defaults == stock.defaults
