"""Layer freezing against "spurious forgetting" (arXiv 2501.13453): see ``math``."""
