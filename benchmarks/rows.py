"""The benchmark's rows and tasks: what it measures, in what order, and what DiEP is compared with."""

from __future__ import annotations

#: rows that calibrate the routers after the named method's pruning (``<method>_cal``)
CALIBRATED_ROWS = ("diep_cal", "diep_merge_cal", "evo_cal", "reap_global_norm_cal", "greedy_lazy_cal", "diep_domain_cal",
                   "diep_search_cal")
#: the uncalibrated row each calibrated row is paired with, where it is not the name without ``_cal``
CALIBRATED_BASE = {"diep_domain_cal": "diep", "diep_search_cal": "diep"}
#: ``diep_search_cal``: DiEP's seed-0 plan calibrated on the search's own text (C4) instead of the default, text
#: sampled from the model itself
#: ``diep_domain_cal``: DiEP's seed-0 plan calibrated on the evaluation domain's own validation split (WikiText-2
#: validation; the test articles it is scored on stay unseen): what a user gets who calibrates on their serving text
DOMAIN_TEXT = "wikitext2_valid.txt"

TASKS = ["kit_wikitext2", "kit_blimp", "kit_arc_easy", "kit_piqa", "kit_hellaswag", "kit_copa", "kit_lambada"]
HEADLINE = {"kit_wikitext2": "word_perplexity", "kit_blimp": "acc", "kit_arc_easy": "acc", "kit_piqa": "acc",
            "kit_hellaswag": "acc_norm", "kit_copa": "acc", "kit_lambada": "acc"}
LOWER_IS_BETTER = {"kit_wikitext2"}

#: every quality row, in the order a run measures them (``--methods`` picks a subset)
QUALITY_ROWS = ("diep", "diep_uniform", "diep_merge", "diep_skip", "diep_evo", "random", "frequency", "reap",
                "reap_global_norm", "evo", "ablation", "greedy", "greedy_lazy", "naee",
                *CALIBRATED_ROWS)
#: the search-cost table's rows: the floor, every method that chooses experts, and the references
COST_ROWS = ("floor", "diep", "frequency", "reap", "reap_global_norm", "naee", "evo", "diep_evo", "ablation", "greedy",
             "greedy_lazy", "diep_cal")
ALLOCATORS = ("diep", "diep_evo", "evo", "reap_global_norm", "ablation", "greedy", "greedy_lazy")
BASELINES = ("random", "frequency", "reap", "naee", "reap_global_norm", "evo")
#: what DiEP is compared with, document by document: its own uniform ablation, the peers, the references
COMPARED = ("diep_uniform", "diep_evo", "reap_global_norm", "evo", "greedy", "greedy_lazy", "ablation", "reap", "frequency", "naee", "random")
LABELS = {"diep": "**diep**", "diep_merge": "diep+merge", "diep_skip": "diep+skip", "diep_uniform": "diep-uniform",
          "diep_evo": "diep+evo"}
