"""Continual-learning defences beyond LifeAlign, one sub-package per method (math apart from plumbing):

- ``averaging``: model averaging at task boundaries (arXiv 2309.06256);
- ``merging``: merging per-task adapters with PEFT's ``add_weighted_adapter`` (linear, TIES, DARE);
- ``ewc``: online EWC on the LoRA factors;
- ``lwf``: a KL anchor on a prompt-only memory;
- ``freezing``: freezing the lowest layers after the first task (arXiv 2501.13453);
- ``olora``: O-LoRA, one adapter per task with an orthogonality penalty (arXiv 2310.14152);
- ``budget``: a forgetting budget that pulls the adapter back toward the task's start.

Each is a ``TaskBoundaryCallback`` (``base``) configured by one dataclass (``config``); ``factory`` builds them in
the order their hooks must run. The SLMC subspace memory lives with SLMC (``trl_lifealign.slmc``).
"""
