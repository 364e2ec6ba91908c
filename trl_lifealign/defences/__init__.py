"""Continual-learning defences beyond LifeAlign: one sub-package per method (math apart from plumbing)."""
