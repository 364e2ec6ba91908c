"""Online elastic weight consolidation (Schwarz et al. 2018, "Progress & Compress"): see ``math``."""
