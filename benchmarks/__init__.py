"""Benchmarks and studies of trl-lifealign (not part of the installed package): run from a checkout."""
