"""A KL anchor to the previous model, Learning-without-Forgetting style: see ``math``."""
