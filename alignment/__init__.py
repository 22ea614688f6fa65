"""smoe-align: distilled SFT and DPO for sparse Mixture-of-Experts models (the student side)."""

__version__ = "0.1.0"
