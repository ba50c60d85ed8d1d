"""Lightning callbacks of diep_lightning, installed as ``diep_lightning.callbacks``.

Each is usable from YAML (``trainer.callbacks``) or the command line (``--trainer.callbacks+=ExpertMerging``).
"""

from diep_lightning.callbacks.lm_eval import LmEvalValidation
from diep_lightning.callbacks.merging import ExpertMerging
from diep_lightning.callbacks.pruning import GlobalExpertPruning
from diep_lightning.callbacks.router import RouterCalibration
from diep_lightning.callbacks.skipping import SkipCalibration
from diep_lightning.callbacks.step import PruningStep

__all__ = ["ExpertMerging", "GlobalExpertPruning", "LmEvalValidation", "PruningStep", "RouterCalibration",
           "SkipCalibration"]
