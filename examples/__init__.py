"""Demo apps on slm-export bundles (predictive text, assistant) and the generation layer they share.

A package so the apps start with ``python -m examples.<app>`` from the repository root and the tests
import them as ``examples.*`` (tests/test_examples.py puts the repository root on ``sys.path``).
"""
