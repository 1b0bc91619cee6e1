"""Evaluation: the papers' metrics per case and region, tables across heads and folds, pictures."""
