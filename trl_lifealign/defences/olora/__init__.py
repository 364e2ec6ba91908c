"""O-LoRA (arXiv 2310.14152): orthogonality between the new task's LoRA A and the earlier ones: see ``math``."""
