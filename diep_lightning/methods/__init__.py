"""Pruning methods, one file each: ``diep`` (the search's LightningModule); the statistics baselines ``random``,
``frequency``, ``reap``, ``naee``; the EvoESAP-style allocation ``evo``; and the references ``ablation`` and
``greedy`` (scorers run by :class:`BaselineModule`), found by name through a registry."""

# importing registers each method, in the order the CLI lists them
from diep_lightning.methods import random  # noqa: F401, I001
from diep_lightning.methods import frequency  # noqa: F401
from diep_lightning.methods import reap  # noqa: F401
from diep_lightning.methods import naee  # noqa: F401
from diep_lightning.methods import evo  # noqa: F401
from diep_lightning.methods import ablation  # noqa: F401
from diep_lightning.methods import greedy  # noqa: F401
from diep_lightning.methods.base import SEARCH_METHOD, Scorer, make_scorer, method_names, register_method
from diep_lightning.methods.diep import DiEPModule
from diep_lightning.methods.frequency import FrequencyScorer
from diep_lightning.methods.naee import NaeeScorer
from diep_lightning.methods.random import RandomScorer
from diep_lightning.methods.reap import ReapScorer
from diep_lightning.methods.statistics import BaselineModule

__all__ = ["SEARCH_METHOD", "BaselineModule", "DiEPModule", "FrequencyScorer", "NaeeScorer", "RandomScorer",
           "ReapScorer", "Scorer", "make_scorer", "method_names", "register_method"]
