"""The stop rules of trainers/early_stop.py on hand-made pseudo-Dice histories (the end-to-end stop through
nnUNetv2_train is in tests/test_e2e_medsegdiff.py)."""
import math

from nnunet_diffusion.trainers.early_stop import StopRule, last_improvement, stop_reason


def test_last_improvement_needs_more_than_min_delta():
    assert last_improvement([], 0.01) == -1
    assert last_improvement([0.1, 0.5, 0.505, 0.509], 0.01) == 1   # rises within 0.01 do not count
    assert last_improvement([0.1, 0.5, 0.505, 0.52], 0.01) == 3    # 0.52 > 0.505 + 0.01
    assert last_improvement([math.nan, 0.2, math.nan], 0.0) == 1


def test_off_by_default_and_on_an_empty_history():
    assert stop_reason([0.0] * 1000, 10, StopRule()) is None
    assert stop_reason([], 10, StopRule(plateau_steps=10)) is None


def test_plateau_fires_after_the_patience_in_optimiser_steps():
    rule = StopRule(plateau_steps=30, min_delta=0.01)
    rising = [0.1, 0.3, 0.5]
    assert stop_reason(rising + [0.5, 0.5], 10, rule) is None       # 20 steps since the last rise
    reason = stop_reason(rising + [0.5, 0.5, 0.505], 10, rule)      # 30 steps
    assert reason.startswith("plateau") and "30 optimiser steps" in reason


def test_chance_fires_only_after_its_steps_and_only_below_its_dice():
    rule = StopRule(chance_steps=40, chance_dice=0.1)
    flat = [0.02, 0.03, 0.02]
    assert stop_reason(flat, 10, rule) is None                       # 30 steps: too early to say
    assert stop_reason(flat + [0.03], 10, rule).startswith("chance")
    assert stop_reason([0.02, 0.03, 0.15, 0.03], 10, rule) is None   # it segmented once: not at chance
    assert stop_reason([math.nan] * 4, 10, rule).startswith("chance")


def test_a_history_from_a_later_stage_counts_the_earlier_steps_towards_chance():
    rule = StopRule(chance_steps=40, chance_dice=0.1)
    assert stop_reason([0.0, 0.0], 10, rule) is None
    assert stop_reason([0.0, 0.0], 10, rule, first_epoch=2).startswith("chance: after 40")
