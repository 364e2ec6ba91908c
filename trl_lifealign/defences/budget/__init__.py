"""A forgetting budget: the largest step towards the trained adapter that keeps every earlier task: see ``math``."""
