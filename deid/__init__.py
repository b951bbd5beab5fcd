"""deid: face identity replacement in images and video (Nitzan et al., SIGGRAPH Asia 2020)."""

import os

__version__ = "0.1.0"

# torch's OpenMP threads (GNU libgomp) busy-wait 300,000 spins after each parallel region before they sleep. The
# audit's worker processes share the cores with them, and those spins took the worker's time: on 2 cores,
# anonymize with the audit spent 53 CPU-seconds in the main process for 60 frames, 42 with 10,000 spins, and ran
# 15 % faster (1.66 -> 1.91 frames/s; without the audit 2.99 -> 2.91). libgomp reads this once, when torch loads,
# so it is set here, before any module of ours imports torch; a value the user set is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
