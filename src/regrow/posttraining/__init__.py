"""Post-training sparsity: a dense trained model and a small calibration set in, a sparse model out.

``pieces`` holds what the methods share (calibration sets, BatchNorm recalibration, layer inputs, magnitude, POT,
Wanda, UniPTS's objective); ``runner`` composes them into ``regrow pts``'s four methods and writes the run.
"""

from . import pieces
from .runner import BASELINE_DEFAULTS, PTS_METHODS, UNIPTS_DEFAULTS, PostTraining, PTSConfig, method_defaults, run_pts

__all__ = ["BASELINE_DEFAULTS", "PTS_METHODS", "UNIPTS_DEFAULTS", "PTSConfig", "PostTraining", "method_defaults",
           "pieces", "run_pts"]
