"""deid: face identity replacement in images and video (Nitzan et al., SIGGRAPH Asia 2020)."""

__version__ = "0.1.0"
