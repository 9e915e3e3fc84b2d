"""Post-training sparsity: a dense trained model and a small calibration set in, a sparse model out.

``calibration`` holds what the methods share (calibration sets, BatchNorm recalibration, layer inputs, masks at a
per-layer sparsity); ``methods`` the method classes' base and registry (and magnitude pruning); ``pot``, ``wanda``
and ``unipts`` one method each with its pieces; ``runner`` runs one method and writes the run (``regrow pts``).
Every piece is importable from this package (``from regrow import posttraining as pts; pts.wanda_masks(...)``).
"""

from .calibration import (
    apply_masks,
    calibration_set,
    input_columns,
    keep_count,
    layer_inputs,
    magnitude_masks,
    observe_inputs,
    recalibrate_batchnorm,
    select_mask,
)
from .methods import Magnitude, MaskingMethod, PostTrainingMethod, pts_names, register_pts, resolve_pts
from .pot import POT, pot_refit
from .runner import InMemoryRun, PostTraining, PTSConfig, method_defaults, run_pts, sparsify_model
from .unipts import (
    PTS_DISTRIBUTIONS,
    UNIPTS_DEFAULTS,
    DynamicSparsity,
    SparsitySearch,
    UniPTS,
    base_decayed_kl,
    regrow_sparsities,
    tau_at,
)
from .wanda import Wanda, input_norms, input_square_sums, row_masks, wanda_masks

for _cls in (UniPTS, POT, Wanda, Magnitude):
    register_pts(_cls.name, _cls)

__all__ = ["POT", "PTS_DISTRIBUTIONS", "UNIPTS_DEFAULTS", "DynamicSparsity", "Magnitude", "MaskingMethod", "PTSConfig",
           "PostTraining", "PostTrainingMethod", "SparsitySearch", "UniPTS", "Wanda", "apply_masks", "base_decayed_kl",
           "calibration_set", "input_columns", "input_norms", "input_square_sums", "keep_count", "layer_inputs",
           "magnitude_masks", "method_defaults", "observe_inputs", "pot_refit", "pts_names", "recalibrate_batchnorm",
           "regrow_sparsities", "register_pts", "resolve_pts", "row_masks", "run_pts", "select_mask", "sparsify_model",
           "tau_at", "wanda_masks", "InMemoryRun"]
