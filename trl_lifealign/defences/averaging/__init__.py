"""Model averaging at a task boundary ("Mitigating the Alignment Tax of RLHF", arXiv 2309.06256): see ``math``."""
