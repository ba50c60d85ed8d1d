"""Offline evaluation kit: lm-eval 0.4 tasks (``kit_*``) over local data files.

>>> from diep_lightning.evaluation import evaluate, list_kit_tasks
>>> list_kit_tasks()                       # doctest: +SKIP
['kit_arc_challenge', 'kit_arc_easy', 'kit_blimp', ...]
>>> evaluate("models/tiny-moe", tasks=["kit_blimp", "kit_wikitext2"], limit=100)  # doctest: +SKIP
{'kit_blimp': {'acc': 0.71, 'n': ...}, ..., 'kit_blimp/acc': 0.71, 'kit_wikitext2/word_perplexity': ...}

CLI: ``python -m diep_lightning.evaluation --model DIR --tasks kit_blimp,kit_wikitext2 --limit 100``.
"""

from . import kit
from .kit import *  # noqa: F403  (the public API is kit's)

__all__ = kit.__all__
