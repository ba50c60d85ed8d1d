"""Router calibration: after experts are removed (or merged), train the surviving routers so the pruned model's
next-token distribution matches the original model's (Router KD, Hyeon and Do 2026). Experts stay frozen and no
shape changes, so an export stays the checkpoint it was.

    teacher = capture_teacher(model, batches, settings)        # before removal: top-k logits + log-sum-exp
    ...remove experts...
    record = calibrate_routers(model, teacher, settings)      # KL(original || pruned), held-out early stopping

The teacher is the original model itself, captured before removal: per token its ``top_k_logits`` largest
logits, their vocabulary ids and the log-sum-exp, so memory is ``top_k_logits * 8 + 4`` bytes per token whatever
the vocabulary; the rest of the vocabulary is one "tail" bucket in the KL, which keeps it exact for the
distribution over (top-k ids, everything else).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from diep_lightning.families import get_family

#: parameter groups a family may offer (each family's ``calibration_groups`` says which it has)
GROUPS = ("router", "norm", "attention_norm", "shared_gate")


@dataclass
class RouterCalibrationSettings:
    """What router calibration trains and how; every field is checked by :meth:`check` in one line.

    Defaults are chosen on held-out calibration text (benchmarks/TUNING.md, "Router calibration").
    """

    groups: tuple[str, ...] = ("router", "norm")
    steps: int = 300
    lr: float = 3e-3
    temperature: float = 1.0
    top_k_logits: int = 256
    batch_size: int = 4
    holdout: float = 0.125
    eval_every: int = 25
    patience: int = 3
    seed: int = 0

    def check(self) -> RouterCalibrationSettings:
        groups = (self.groups,) if isinstance(self.groups, str) else tuple(self.groups)
        if not groups:
            raise ValueError(f"groups: name at least one parameter group to train, from {list(GROUPS)}")
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise ValueError(f"groups: unknown parameter group {unknown[0]!r}; choose from {list(GROUPS)}")
        self.groups = groups
        for name in ("steps", "top_k_logits", "batch_size", "eval_every", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) or not 0 < self.holdout < 1:
            raise ValueError(f"holdout: the share of calibration sequences kept for early stopping must be in (0, 1), "
                             f"got {self.holdout!r}")
        return self

    def check_family(self, family: Any) -> None:
        """Refuse a group the model's family does not have, before any model work."""
        for group in self.groups:
            family.check_calibration_group(group)


def settings_from(value: Any) -> RouterCalibrationSettings | None:
    """``prune(calibrate_router=...)``: None/False (off), True (defaults), a dict of fields or the settings."""
    if value is None or value is False:
        return None
    if value is True:
        return RouterCalibrationSettings().check()
    if isinstance(value, RouterCalibrationSettings):
        return value.check()
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(RouterCalibrationSettings.__dataclass_fields__))
        if unknown:
            raise ValueError(f"calibrate_router: unknown setting {unknown[0]!r}; known: "
                             f"{sorted(RouterCalibrationSettings.__dataclass_fields__)}")
        return RouterCalibrationSettings(**value).check()
    raise ValueError(f"calibrate_router: expected True, a dict of settings or RouterCalibrationSettings, got {value!r}")


@dataclass
class TeacherTargets:
    """The original model's next-token distribution on the calibration sequences, bounded in memory."""

    input_ids: torch.Tensor          # (N, T)
    attention_mask: torch.Tensor     # (N, T)
    values: torch.Tensor             # (N, T, k) top-k logits / temperature, float32
    indices: torch.Tensor            # (N, T, k) their vocabulary ids
    lse: torch.Tensor                # (N, T) log-sum-exp of logits / temperature over the vocabulary
    temperature: float = 1.0

    def tail_mass(self) -> float:
        """Mean teacher probability outside its top-k ids (how much the coarsened KL leaves out)."""
        top = (self.values - self.lse.unsqueeze(-1)).exp().sum(-1)
        weight = self.attention_mask.float()
        return float(((1.0 - top).clamp_min(0) * weight).sum() / weight.sum().clamp_min(1.0))

    def nbytes_per_token(self) -> int:
        return int(self.values.shape[-1] * (self.values.element_size() + 4) + self.lse.element_size())


def _sequences(batches: Iterable[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, masks = [], []
    for batch in batches:
        x = batch["input_ids"]
        ids.append(x)
        masks.append(batch.get("attention_mask", torch.ones_like(x)))
    if not ids:
        raise ValueError("batches: router calibration needs calibration text; pass a few calibration batches")
    width = max(x.shape[1] for x in ids)
    if any(x.shape[1] != width for x in ids):
        raise ValueError("batches: calibration batches of different lengths; use one seq_len")
    return torch.cat(ids), torch.cat(masks)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_teacher(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                    settings: RouterCalibrationSettings) -> TeacherTargets:
    """Run the (unpruned) ``model`` on the calibration sequences and keep its top-k next-token logits."""
    ids, mask = _sequences(batches)
    if ids.shape[0] < 2:
        raise ValueError("batches: router calibration needs at least 2 calibration sequences (one is held out)")
    device, tau = _device(model), float(settings.temperature)
    values, indices, lse = [], [], []
    for start in range(0, ids.shape[0], settings.batch_size):
        x, m = ids[start:start + settings.batch_size].to(device), mask[start:start + settings.batch_size].to(device)
        logits = model(input_ids=x, attention_mask=m, use_cache=False).logits.float() / tau
        k = min(settings.top_k_logits, logits.shape[-1])
        top = logits.topk(k, dim=-1)
        values.append(top.values.cpu())
        indices.append(top.indices.to(torch.int32).cpu())
        lse.append(torch.logsumexp(logits, dim=-1).cpu())
    return TeacherTargets(ids, mask, torch.cat(values), torch.cat(indices), torch.cat(lse), tau)


def start_token(model: nn.Module, tokenizer: Any = None) -> int | None:
    """The token a document follows in training: BOS, else EOS (the separator of packed documents)."""
    for holder in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(holder, name, None) if holder is not None else None
            value = value[0] if isinstance(value, (list, tuple)) and value else value
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _cache_names(model: nn.Module) -> tuple[str, str]:
    """(forward's keyword, output's attribute) of the KV cache: ``cache`` in newer transformers 5.x, else
    ``past_key_values``."""
    import inspect

    return ("cache", "cache") if "cache" in inspect.signature(model.forward).parameters else (
        "past_key_values", "past_key_values")


@torch.no_grad()
def sample_sequences(model: nn.Module, num_samples: int, seq_len: int, start: int | torch.Tensor, seed: int = 0,
                     temperature: float = 1.0, batch_size: int = 64) -> torch.Tensor:
    """``(num_samples, seq_len)`` token ids sampled from ``model`` itself, each opening with its ``start`` token.

    Calibration text for the routers drawn from the original model, before removal: it covers what the model
    was trained on rather than one domain (benchmarks/TUNING.md, "Router calibration"). ``start``: one token id
    for every sequence or one per sequence. Sampling is plain ancestral sampling at ``temperature``, seeded.
    """
    for name, value in (("num_samples", num_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    starts = torch.as_tensor(start, dtype=torch.long).reshape(-1)
    starts = starts.expand(num_samples) if starts.numel() == 1 else starts
    if starts.numel() != num_samples:
        raise ValueError(f"start: one token id or one per sequence ({num_samples}), got {starts.numel()}")
    device, generator = _device(model), torch.Generator().manual_seed(seed)
    training = model.training
    model.eval()  # PhiMoE routes at random in train mode
    out = []
    try:
        for first in range(0, num_samples, batch_size):
            tokens = starts[first:first + batch_size, None].clone()
            cache, step_input = {}, tokens
            for _ in range(seq_len - 1):
                result = model(input_ids=step_input.to(device), use_cache=True, **cache)
                cache = {name: getattr(result, attr) for name, attr in (_cache_names(model),)}
                probs = torch.softmax(result.logits[:, -1].float().cpu() / temperature, dim=-1)
                step_input = torch.multinomial(probs, 1, generator=generator)
                tokens = torch.cat([tokens, step_input], dim=1)
            out.append(tokens)
    finally:
        model.train(training)
    return torch.cat(out)


def topk_kl(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, lse: torch.Tensor,
            mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over unmasked tokens of KL(teacher || student) over the teacher's top-k ids plus one tail bucket.

    With k = the vocabulary size this is the exact KL; with fewer ids it is the KL of the two distributions
    coarsened to (top-k ids, the rest), a lower bound that is exact where the teacher's tail is negligible.
    """
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q_top = log_q.gather(-1, indices.long())
    log_p_top = values - lse.unsqueeze(-1)
    p_top = log_p_top.exp()
    kl = (p_top * (log_p_top - log_q_top)).sum(-1)
    p_tail = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    q_tail = (1.0 - log_q_top.exp().sum(-1)).clamp_min(1e-12)
    kl = kl + torch.where(p_tail > 1e-9, p_tail * (p_tail.clamp_min(1e-12).log() - q_tail.log()), torch.zeros_like(kl))
    weight = mask.to(kl.dtype)
    return (kl * weight).sum() / weight.sum().clamp_min(1.0)


def trainable_parameters(model: nn.Module, groups: Sequence[str]) -> dict[str, nn.Parameter]:
    """Every parameter router calibration trains, by its name in ``model`` (the family decides per group)."""
    family = get_family(model)
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, nn.Parameter] = {}
    for block in family.blocks(model):
        for group in groups:
            for param in family.calibration_parameters(model, block, group).values():
                found[names[id(param)]] = param
    if not found:
        raise ValueError(f"groups: {type(family).__name__} exposes no parameters for {list(groups)}; its router "
                         "cannot be calibrated this way")
    return found


@dataclass
class CalibrationRecord:
    """What router calibration did, as ``pruning.json`` records it under ``plan.router_calibration``."""

    settings: dict[str, Any]
    parameters: int
    parameter_names: list[str]
    train_sequences: int
    heldout_sequences: int
    heldout_kl_before: float
    heldout_kl_after: float
    train_kl_before: float
    train_kl_after: float
    steps_run: int
    best_step: int
    seconds: float
    teacher_tail_mass: float
    teacher_bytes_per_token: int
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kl_on(model: nn.Module, teacher: TeacherTargets, rows: torch.Tensor, batch_size: int) -> float:
    device, total, tokens = _device(model), 0.0, 0.0
    with torch.no_grad():
        for start in range(0, rows.numel(), batch_size):
            r = rows[start:start + batch_size]
            mask = teacher.attention_mask[r].to(device)
            logits = model(input_ids=teacher.input_ids[r].to(device), attention_mask=mask, use_cache=False).logits
            n = float(mask.sum())
            total += float(topk_kl(logits, teacher.values[r].to(device), teacher.indices[r].to(device),
                                   teacher.lse[r].to(device), mask, teacher.temperature)) * n
            tokens += n
    return total / max(tokens, 1.0)


def calibrate_routers(model: nn.Module, teacher: TeacherTargets, settings: RouterCalibrationSettings,
                      log: Any = None) -> CalibrationRecord:
    """Train the routers of the (pruned) ``model`` in place towards ``teacher``; keep the best held-out state.

    The last ``holdout`` share of the sequences is never trained on: it scores every ``eval_every`` steps, training
    stops after ``patience`` scores without improvement, and the best-scoring parameters are restored. Parameters
    of any dtype train through float32 master copies (bf16 updates of 1e-3 would round away).
    """
    started = time.perf_counter()
    params = trainable_parameters(model, settings.groups)
    n = teacher.input_ids.shape[0]
    held = max(1, int(round(settings.holdout * n)))
    if n - held < 1:
        raise ValueError("batches: router calibration needs at least 2 calibration sequences (one is held out)")
    train_rows, held_rows = torch.arange(n - held), torch.arange(n - held, n)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()  # deterministic routing (PhiMoE routes at random in train mode), no dropout
    for p in model.parameters():
        p.requires_grad_(False)
    masters = {name: p.detach().float().clone().requires_grad_(True) for name, p in params.items()}
    optimizer = torch.optim.Adam(masters.values(), lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    device = _device(model)

    def snapshot() -> dict[str, torch.Tensor]:
        return {name: m.detach().clone() for name, m in masters.items()}

    def load(state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name].to(p.dtype))

    try:
        before = _kl_on(model, teacher, held_rows, settings.batch_size)
        train_before = _kl_on(model, teacher, train_rows, settings.batch_size)
        best, best_state, best_step, stale, step = before, snapshot(), 0, 0, 0
        history = [{"step": 0, "heldout_kl": before}]
        for p in params.values():
            p.requires_grad_(True)
        order = train_rows[torch.randperm(train_rows.numel(), generator=generator)]
        cursor = 0
        for step in range(1, settings.steps + 1):
            if cursor + settings.batch_size > order.numel():
                order, cursor = train_rows[torch.randperm(train_rows.numel(), generator=generator)], 0
            rows = order[cursor:cursor + settings.batch_size]
            cursor += settings.batch_size
            mask = teacher.attention_mask[rows].to(device)
            logits = model(input_ids=teacher.input_ids[rows].to(device), attention_mask=mask, use_cache=False).logits
            loss = topk_kl(logits, teacher.values[rows].to(device), teacher.indices[rows].to(device),
                           teacher.lse[rows].to(device), mask, teacher.temperature)
            for p in params.values():
                p.grad = None
            loss.backward()
            with torch.no_grad():
                for name, p in params.items():
                    masters[name].grad = None if p.grad is None else p.grad.float()
            optimizer.step()
            load({name: m.detach() for name, m in masters.items()})
            if step % settings.eval_every == 0 or step == settings.steps:
                score = _kl_on(model, teacher, held_rows, settings.batch_size)  # no_grad inside
                history.append({"step": step, "heldout_kl": score, "train_kl": float(loss.detach())})
                if log is not None:
                    log({"router_calibration/heldout_kl": score, "router_calibration/train_kl": float(loss.detach())},
                        step)
                if score < best - 1e-7:
                    best, best_state, best_step, stale = score, snapshot(), step, 0
                else:
                    stale += 1
                    if stale >= settings.patience:
                        break
        load(best_state)
        for p in params.values():
            p.grad = None
            p.requires_grad_(False)
        train_after = _kl_on(model, teacher, train_rows, settings.batch_size)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    return CalibrationRecord(
        settings={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        parameters=sum(p.numel() for p in params.values()), parameter_names=sorted(params),
        train_sequences=int(train_rows.numel()), heldout_sequences=int(held_rows.numel()),
        heldout_kl_before=before, heldout_kl_after=best, train_kl_before=train_before, train_kl_after=train_after,
        steps_run=step, best_step=best_step, seconds=time.perf_counter() - started,
        teacher_tail_mass=teacher.tail_mass(), teacher_bytes_per_token=teacher.nbytes_per_token(), history=history)
