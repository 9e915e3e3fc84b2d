"""regrow: sparse training and post-training sparsity for PyTorch.

The pieces (structures, criteria, allocation, schedules) compose into methods with an optimizer-like
lifecycle::

    import regrow
    sp = regrow.RigL(model, optimizer, sparsity=0.9, distribution="erk", total_steps=10_000)
    ...  # loss.backward(); optimizer.step(); sp.step()
    sp.finalize()
"""

__version__ = "0.1.0"

from . import allocation, criteria, distributed, masking, schedules, structures  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    DataError,
    DistributedError,
    RegrowError,
    TrainingDivergedError,
)
from .methods import (  # noqa: E402
    GMP,
    HALP,
    IEE,
    SET,
    BaseSparsifier,
    ChannelIEE,
    Dense,
    OneShot,
    RigL,
    Sparsifier,
    Static,
    create,
    register,
)
from .models import create_model  # noqa: E402

__all__ = ["BaseSparsifier", "ChannelIEE", "CheckpointError", "ConfigError", "DataError", "Dense", "DistributedError",
           "GMP", "HALP", "IEE", "OneShot", "RegrowError", "RigL", "SET", "Sparsifier", "Static",
           "TrainingDivergedError", "allocation", "create", "create_model", "criteria", "distributed", "masking",
           "register", "schedules", "structures"]
