"""Trainer configurations (TOML): each head's paper hyper-parameters and named variants."""
