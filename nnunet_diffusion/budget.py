"""What a training spent: optimiser steps and wall time, read from nnU-Net's checkpoint. Used by the demo (its
table names every row's budget) and by the comparison table (benchmarks/table.py); both refuse unequal budgets
before any training (:func:`planned_budget`) and after it (the demo's ``trained_budgets``, the table's check of each
finished training).

One optimiser step is one ``train_step`` call: one batch, one update of every part that trains at that stage
(NNDM's joint stage updates backbone and refiner in the same step; it counts once). A head with stages counts all
of them; NNDM seeded from a trained nnU-Net (``NNDIFF_BASELINE``) adds that baseline's budget.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


def optimizer_steps(head: str, variant: str | None) -> int:
    """Optimiser steps (``train_step`` calls) the trainer ``head``/``variant`` takes from scratch."""
    from nnunet_diffusion import config
    return config.spec(head, variant).optimizer_steps


def planned_budget(variant: str, heads, what: str = "the demo") -> int:
    """The optimiser steps every trainer ``<class>_<variant>`` of ``heads`` ((head, class name) pairs) will take;
    unequal budgets are an error before any training (``what`` names the comparison in the message)."""
    from .errors import NNDiffError
    steps = {f"{cls}_{variant}": optimizer_steps(head, variant) for head, cls in heads}
    if len(set(steps.values())) != 1:
        raise NNDiffError(f"--variant {variant}: {what} compares trainers at equal budget, but their schedules take "
                          f"unequal optimiser steps ({', '.join(f'{t}: {s}' for t, s in steps.items())}); make "
                          f"their [variants.{variant}] in trainer_configs/ agree")
    return next(iter(steps.values()))


@dataclass(frozen=True)
class Budget:
    steps: int        # optimiser steps
    seconds: float    # wall time of those steps' epochs


def training_budget(checkpoint: str | os.PathLike) -> Budget:
    """What a (finished or interrupted) training spent, read from its checkpoint: the epochs it completed
    (nnU-Net's ``current_epoch``) x its trainer's ``num_iterations_per_epoch`` optimiser steps, and the wall time of
    those epochs from nnU-Net's own per-epoch timestamps (set-up, data unpacking and the final validation are not
    part of it; a resumed training counts the epochs of the model it finished with, once each). A training seeded
    from another checkpoint (NNDM's ``NNDIFF_BASELINE``: its stage 1 skipped) adds that checkpoint's budget."""
    import torch

    from nnunet_diffusion.trainers import TRAINERS
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    name = ckpt["trainer_name"]
    if name not in TRAINERS:
        raise ValueError(f"{checkpoint}: written by {name!r}, not a trainer of this package; its steps per epoch "
                         f"are unknown")
    steps = int(ckpt["current_epoch"]) * TRAINERS[name].hparams().num_iterations_per_epoch
    log = ckpt["logging"]
    seconds = float(sum(e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])))
    seed = (ckpt.get("nnunet_diffusion") or {}).get("nndm_baseline")
    if seed:
        if not os.path.isfile(seed):
            raise FileNotFoundError(f"{checkpoint} was seeded from {seed}, which no longer exists: its steps are "
                                    f"part of this training's budget")
        before = training_budget(seed)
        steps, seconds = steps + before.steps, seconds + before.seconds
    return Budget(steps, seconds)


def early_stop_of(checkpoint: str | os.PathLike) -> dict | None:
    """Why the training behind ``checkpoint`` ended before its schedule ({"epochs", "steps", "reason"}, written by a
    stop rule of trainers/early_stop.py), or None: it ran its schedule, or is still running."""
    import torch
    return torch.load(checkpoint, map_location="cpu", weights_only=False).get("early_stop")
