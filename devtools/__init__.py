"""Development tools of the repository checkout, above the installed package: they import ``nnunet_diffusion``
and ``benchmarks``; neither imports them (tests/test_architecture.py). Not installed by setup.py.

- :mod:`devtools.docs`: ``make docs`` (``python -m devtools.docs [--check]``), the reference pages and the
  generated blocks of the README and the explanation pages.
"""
