"""Merging temperature screen on the tune.py proxy: one default DiEP search, then global pruning at 25% and 50%
without merging and with ExpertMerging at temperatures 1.0, 0.3 and 0.1; token perplexity of each.

    python benchmarks/tune_merging.py models/tiny-mixtral
"""
import sys, json, argparse, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as B, tune as T
from transformers import AutoModelForCausalLM, AutoTokenizer
from diep_lightning.calibration import observe_blocks
from diep_lightning.callbacks.merging import ExpertMerging
from diep_lightning.export import apply_plan
from diep_lightning.families import get_family
from diep_lightning.pruning import select_experts
torch.set_num_threads(1)
m = sys.argv[1]
a = argparse.Namespace(epochs=10, num_samples=64, seq_len=128, batch_size=16)
tok = AutoTokenizer.from_pretrained(m)
ids = torch.tensor(tok(T.DATA.read_text()[:400_000])["input_ids"][:32768])
mod, dm = B.search(m, "diep", a, data_seed=42)
scores = mod.expert_scores()
batches = list(dm.train_dataloader())[:4]
res = {"model": m}
for sp in (0.25, 0.5):
    for t in (None, 1.0, 0.3, 0.1):
        model = AutoModelForCausalLM.from_pretrained(m).eval()
        fam = get_family(model); blocks = fam.blocks(model)
        plan = select_experts(scores, sp, [b.top_k for b in blocks], "global")
        if t is not None:
            merger = ExpertMerging(temperature=t)
            obs = observe_blocks(model, fam, batches, merger.max_tokens)
            plan.merges = [merger.merge_groups(fam, b, obs[b.index], plan.kept[b.index], plan.removed[b.index]) if plan.removed[b.index] else {} for b in blocks]
        apply_plan(model, plan, fam)
        res[f"{sp}_{t}"] = round(T.token_perplexity(model, ids), 2)
        print(sp, t, res[f"{sp}_{t}"], flush=True)
print(json.dumps(res))
