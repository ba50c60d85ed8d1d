#!/usr/bin/env python3
"""Train a tiny Mixture-of-Experts causal LM from scratch on the offline training corpus.

The project ships four small, *trained* MoE language models so that expert pruning can be judged on
real models (random weights cannot tell good pruning from bad):

* ``models/tiny-mixtral``   -- ``MixtralForCausalLM``, 8 experts, top-2 routing.
* ``models/tiny-qwen-moe``  -- ``Qwen2MoeForCausalLM``, 32 routed experts, top-4 routing, one shared
  expert with its sigmoid gate, every layer sparse.
* ``models/tiny-mixtral-deep`` -- ``MixtralForCausalLM`` with 8 MoE layers (8 experts, top-2) of a narrower
  width: a harder test bed for allocation, where redundancy can differ between many layers.
* ``models/tiny-qwen3-deep`` -- ``Qwen3MoeForCausalLM``: a dense first layer (``mlp_only_layers=[0]``), then 8 MoE
  layers (8 experts, top-2): the dense layer takes the token-identity work, so no MoE layer dominates.

All share one byte-level BPE tokenizer (vocab 8192) trained on the same text. The text is every file
of ``<data-dir>/train_corpus`` (C4 validation 2k, Gutenberg, State-of-the-Union, inaugural addresses,
tiny-shakespeare, WikiText-2 *validation*). ``<data-dir>/eval`` (WikiText-2 test, BLiMP, ...) and
``<data-dir>/calibration`` are never read.

Reproduce the shipped models (CPU, from the repository root; times and machines in ``tools/README_models.md``)::

    # the tokenizer (shared by all four models; shipped in models/tiny-mixtral, which the commands below read)
    python -m tools.train_tiny_moe --tokenizer-only --out /tmp/runs/tokenizer
    # tiny-mixtral: 2300 steps of 8 x 256 tokens (4.71 M tokens, 1.2 epochs), one thread
    python -m tools.train_tiny_moe --arch mixtral --out /tmp/runs/tiny-mixtral --tokenizer models/tiny-mixtral \
        --seed 0 --threads 1 --batch-size 8 --lr 2.5e-3 --warmup 200 --balance-loss per-layer \
        --max-steps 2300 --max-minutes 59 --eval-every 500 --log-every 100
    # tiny-qwen-moe: 2000 steps of 8 x 256 tokens (4.10 M tokens, 1.0 epoch), one thread
    python -m tools.train_tiny_moe --arch qwen-moe --out /tmp/runs/tiny-qwen-moe --tokenizer models/tiny-mixtral \
        --seed 0 --threads 1 --batch-size 8 --lr 2.5e-3 --warmup 200 --balance-loss per-layer \
        --max-steps 2000 --max-minutes 59 --eval-every 500 --log-every 100
    # tiny-mixtral-deep: 2600 steps of 8 x 256 tokens (5.32 M tokens, 1.3 epochs), one thread
    python -m tools.train_tiny_moe --arch mixtral-deep --out /tmp/runs/tiny-mixtral-deep --tokenizer models/tiny-mixtral \
        --seed 0 --threads 1 --batch-size 8 --lr 2.5e-3 --warmup 200 --balance-loss per-layer \
        --max-steps 2600 --max-minutes 75 --eval-every 500 --log-every 100
    # tiny-qwen3-deep: 2600 steps of 8 x 256 tokens (5.32 M tokens, 1.3 epochs), one thread
    python -m tools.train_tiny_moe --arch qwen3-deep --out /tmp/runs/tiny-qwen3-deep --tokenizer models/tiny-mixtral \
        --seed 0 --threads 1 --batch-size 8 --lr 2.5e-3 --warmup 200 --balance-loss per-layer \
        --max-steps 2600 --max-minutes 75 --eval-every 500 --log-every 100
    python -m tools.model_card --model models/tiny-mixtral --threads 2
    python -m tools.model_card --model models/tiny-qwen-moe --threads 2
    python -m tools.model_card --model models/tiny-mixtral-deep --threads 2
    python -m tools.model_card --model models/tiny-qwen3-deep --threads 1

then copy each finished ``/tmp/runs/<model>`` into ``models/`` (``--out`` inside ``models/`` is refused, so a
half-finished run never replaces a shipped model); each ``training_log.json`` records its command verbatim.

All shipped models use the same recipe (batch 8 x 256, peak lr 2.5e-3, 200 warm-up steps, per-layer
balancing, about one epoch). ``--piece-chars`` (windows that start at short, paragraph-aligned pieces) was
tried on tiny-mixtral and is not used: see ``tools/README_models.md``.

The script's defaults are the first recipe: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak lr 2e-3,
60 warm-up steps, cosine to 10%, batch 16 x 256 tokens, grad-norm clip 1.0, fp32, transformers'
built-in load-balancing loss with coefficient 0.01 (``--balance-loss global``).

The final model is the result of exactly ``--max-steps`` optimizer steps (bit-for-bit deterministic
for a fixed seed and thread count on one CPU type); ``--max-minutes`` is only a safety stop, and
``training_log.json`` records ``stopped_by_time_limit`` if it ever fired. A checkpoint
(``<out>/resume_checkpoint.pt``, removed at the end) is written every ``--ckpt-every`` steps, so a
killed run continues bit-for-bit when the same command is run again.

transformers' ``load_balancing_loss_func`` pools the routing statistics of all layers before
multiplying them, so it only balances each expert's load summed over layers: with it a layer can
starve experts. ``--balance-loss per-layer`` (:func:`balance_loss_per_layer`) balances every layer; both shipped
models use it.

Each output directory receives ``model.safetensors`` (fp32), ``config.json``,
``generation_config.json``, the tokenizer files and ``training_log.json`` (arch, seed, steps, tokens
seen, wall time, final training loss, validation loss/perplexity on the held-out last 1% of the token
stream, per-layer expert-usage histogram on that split, and the exact command line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
EOT = "<|endoftext|>"
VOCAB_SIZE = 8192
CHUNK_CHARS = 8000  # long files are cut at paragraph breaks into pieces of about this size
DATA_SHUFFLE_SEED = 1234  # fixed: the train/validation split does not depend on --seed
VAL_FRACTION = 0.01


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def _split_paragraph_chunks(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut a long text at blank lines into pieces of at most about ``max_chars`` characters.

    Args:
        text: The text of one file.
        max_chars: Target upper size of a piece (a single longer paragraph stays whole).

    Returns:
        Non-empty pieces whose concatenation (with blank lines) is the original text.
    """
    paragraphs = re.split(r"\n\s*\n", text)
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for para in paragraphs:
        if current and size + len(para) > max_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        chunks.append("\n\n".join(current))
    return [c.strip("\n") for c in chunks if c.strip()]


def load_documents(data_dir: Path) -> list[str]:
    """Read every training document of ``<data_dir>/train_corpus`` in a fixed order.

    C4 records are one document each; every other file is cut into paragraph-aligned pieces so that
    the deterministic document shuffle mixes sources. README files (corpus metadata) are skipped.

    Args:
        data_dir: The shared data directory (holding ``train_corpus/``).

    Returns:
        The list of document strings.

    Raises:
        FileNotFoundError: If the training corpus is missing.
    """
    corpus = data_dir / "train_corpus"
    if not corpus.is_dir():
        raise FileNotFoundError(f"training corpus not found: {corpus}")
    docs: list[str] = []
    with open(corpus / "c4_en_validation_2k.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                text = json.loads(line)["text"].strip()
                if text:
                    docs.append(text)
    files = sorted((corpus / "gutenberg").glob("*.txt"))
    files += sorted((corpus / "state_union").glob("*.txt"))
    files += sorted((corpus / "inaugural").glob("*.txt"))
    files += [corpus / "tinyshakespeare.txt", corpus / "wikitext2_valid.txt"]
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        docs.extend(_split_paragraph_chunks(text))
    return docs


def shuffle_documents(docs: list[str], seed: int = DATA_SHUFFLE_SEED) -> list[str]:
    """Return the documents in a deterministic pseudo-random order.

    Args:
        docs: Documents in reading order.
        seed: Shuffle seed.

    Returns:
        A shuffled copy.
    """
    out = list(docs)
    random.Random(seed).shuffle(out)
    return out


def tokenize_stream(tokenizer: Any, docs: list[str]) -> torch.Tensor:
    """Encode documents into one token stream, each document preceded by ``<|endoftext|>``.

    Args:
        tokenizer: A ``PreTrainedTokenizerFast``.
        docs: Documents in stream order.

    Returns:
        A 1-D ``torch.long`` tensor of token ids.
    """
    eot = tokenizer.convert_tokens_to_ids(EOT)
    encoded = tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    ids: list[int] = []
    for enc in encoded:
        ids.append(eot)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def split_short_pieces(doc: str, max_chars: int) -> list[str]:
    """Cut one document into paragraph-aligned pieces of at most about ``max_chars`` characters.

    Documents with blank lines (books, speeches, Shakespeare, WikiText) are cut at blank lines; documents
    without (C4 web pages, whose paragraphs are single lines) at line breaks. Hard-wrapped book lines
    are never cut apart, so every piece starts at the start of a paragraph, that is of a sentence.

    Args:
        doc: The document text.
        max_chars: Target upper size of a piece (a single longer paragraph stays whole).

    Returns:
        Non-empty pieces, in order.
    """
    sep = "\n\n" if re.search(r"\n\s*\n", doc) else "\n"
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n" if sep == "\n\n" else r"\n+", doc)]
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for para in paragraphs:
        if not para:
            continue
        if current and size + len(para) > max_chars:
            pieces.append(sep.join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + len(sep)
    if current:
        pieces.append(sep.join(current))
    return pieces


def short_piece_stream(tokenizer: Any, docs: list[str], n_train_tokens: int, max_chars: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-encode the training part of the stream with ``<|endoftext|>`` before every short piece.

    The validation split stays exactly the one of :func:`tokenize_stream` (the last tokens of the
    same document stream), so validation losses remain comparable across recipes. Training documents
    that lie wholly inside the training part are cut by :func:`split_short_pieces`; the one document
    the split cuts through keeps its training-side tokens as they were.

    Why: the kit scores a BLiMP sentence as ``log p(sentence | <|endoftext|>)``, a short text right
    after the separator with nothing before it. With ~8 k-character documents and windows at random
    offsets the model sees that situation about once per 2 k tokens; with ~1 k-character pieces and
    windows that start at the pieces (see :class:`BatchSampler`) it sees it in nearly every window.
    Measured on tiny-mixtral (two seeds): WikiText-2 perplexity fell 15-18%, BLiMP did not rise.

    Args:
        tokenizer: A ``PreTrainedTokenizerFast``.
        docs: Documents in stream order (as given to :func:`tokenize_stream`).
        n_train_tokens: Length of the training part of :func:`tokenize_stream`'s stream.
        max_chars: Target upper size of a piece.

    Returns:
        ``(ids, starts)``: the training token stream and the positions of its separators.
    """
    eot = tokenizer.convert_tokens_to_ids(EOT)
    backend = tokenizer.backend_tokenizer
    encoded = backend.encode_batch(docs, add_special_tokens=False)
    ids: list[int] = []
    starts: list[int] = []
    used = 0
    for doc, enc in zip(docs, encoded):
        length = 1 + len(enc.ids)
        if used + length > n_train_tokens:  # the document the train/validation split cuts through
            tail = ([eot] + enc.ids)[: n_train_tokens - used]
            if tail:
                starts.append(len(ids))
                ids.extend(tail)
            break
        used += length
        for piece_enc in backend.encode_batch(split_short_pieces(doc, max_chars), add_special_tokens=False):
            starts.append(len(ids))
            ids.append(eot)
            ids.extend(piece_enc.ids)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(starts, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
def train_tokenizer(docs: list[str], vocab_size: int = VOCAB_SIZE) -> Any:
    """Train a GPT-2 style byte-level BPE tokenizer and wrap it as ``PreTrainedTokenizerFast``.

    Args:
        docs: Training documents.
        vocab_size: Target vocabulary size, special token included.

    Returns:
        The fast tokenizer; ``<|endoftext|>`` (id 0) is its bos, eos, unk and pad token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )


def get_tokenizer(tokenizer_dir: Path | None, docs: list[str]) -> Any:
    """Load the tokenizer from ``tokenizer_dir`` if it holds one, else train a new one.

    Args:
        tokenizer_dir: Directory with saved tokenizer files, or ``None``.
        docs: Training documents (used only when training).

    Returns:
        The fast tokenizer.
    """
    from transformers import AutoTokenizer

    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        print(f"[tok] loading tokenizer from {tokenizer_dir}", flush=True)
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    print(f"[tok] training byte-level BPE (vocab {VOCAB_SIZE}) on {len(docs)} documents", flush=True)
    return train_tokenizer(docs)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
def build_config(arch: str, tokenizer: Any, seq_len: int, aux_coef: float) -> Any:
    """Create the model configuration for one architecture.

    Args:
        arch: ``"mixtral"``, ``"qwen-moe"``, ``"mixtral-deep"`` (8 MoE layers of a narrower width, so that
            redundancy can differ between layers and allocators have something to separate) or ``"qwen3-deep"``
            (the same 8 MoE layers after a dense first layer).
        tokenizer: The tokenizer (for vocabulary size and special token ids).
        seq_len: Training context length (stored as ``max_position_embeddings``).
        aux_coef: Router load-balancing loss coefficient.

    Returns:
        A ``MixtralConfig`` or ``Qwen2MoeConfig``; ``output_router_logits`` is left ``False`` so the
        saved model behaves like a stock checkpoint (training passes it explicitly).
    """
    from transformers import MixtralConfig, Qwen2MoeConfig

    eot = tokenizer.convert_tokens_to_ids(EOT)
    common: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=True,
        output_router_logits=False,
        router_aux_loss_coef=aux_coef,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    if arch == "mixtral":
        return MixtralConfig(
            hidden_size=192,
            intermediate_size=224,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=None,
            router_jitter_noise=0.0,
            **common,
        )
    if arch == "mixtral-deep":
        common.update(num_hidden_layers=8)  # head_dim 32: a size vLLM's CPU attention serves
        return MixtralConfig(
            hidden_size=128,
            intermediate_size=192,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=None,
            router_jitter_noise=0.0,
            **common,
        )
    if arch == "qwen3-deep":
        # a dense first layer takes the token-identity work that made tiny-mixtral-deep's first MoE layer
        # dominate; 8 MoE layers follow
        from transformers import Qwen3MoeConfig

        common.update(num_hidden_layers=9)
        return Qwen3MoeConfig(
            hidden_size=128,
            intermediate_size=384,
            moe_intermediate_size=192,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[0],
            head_dim=32,
            use_sliding_window=False,
            **common,
        )
    if arch == "qwen-moe":
        return Qwen2MoeConfig(
            hidden_size=160,
            intermediate_size=256,  # dense-MLP width; unused because every layer is sparse
            moe_intermediate_size=64,
            shared_expert_intermediate_size=256,
            num_experts=32,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=False,
            qkv_bias=True,
            **common,
        )
    raise ValueError(f"unknown arch {arch!r}")


def build_model(config: Any, experts_impl: str, balance_loss: str = "global") -> torch.nn.Module:
    """Instantiate a freshly initialised causal LM for ``config``.

    Args:
        config: A model configuration from :func:`build_config`.
        experts_impl: Experts kernel used for training (``eager``, ``batched_mm`` or ``grouped_mm``).
        balance_loss: ``"per-layer"`` switches off the model's own (pooled) aux loss on this instance,
            since training adds the per-layer loss itself; the saved config keeps its coefficient.

    Returns:
        The model, in fp32, in training mode.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.set_experts_implementation(experts_impl)
    if balance_loss == "per-layer":
        model.router_aux_loss_coef = 0.0
    model.train()
    return model


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms, biases).

    Args:
        model: The model.
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay for >= 2-D parameters.

    Returns:
        The optimizer.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, max_steps: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up then cosine decay to ``min_ratio * peak``.

    Args:
        step: Zero-based optimizer step.
        max_steps: Total number of steps.
        peak: Peak learning rate.
        warmup: Warm-up steps.
        min_ratio: Final learning rate as a fraction of ``peak``.

    Returns:
        The learning rate for ``step``.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def balance_loss_per_layer(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss computed for each MoE layer separately, then averaged.

    transformers' ``load_balancing_loss_func`` pools the routing statistics of all layers before
    multiplying them, so it only balances the *sum over layers* of each expert's load: a layer may then
    starve some experts as long as another layer over-uses them. Balancing each layer keeps every
    expert of every layer in use, which expert pruning needs. Same scale as the transformers loss:
    ``top_k`` when perfectly balanced.

    Args:
        router_logits: One ``(tokens, num_experts)`` tensor per MoE layer.
        num_experts: Routed experts per layer.
        top_k: Experts selected per token.

    Returns:
        Scalar loss.
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        frac_tokens = torch.nn.functional.one_hot(chosen, num_experts).float().sum(dim=1).mean(dim=0)
        losses.append(num_experts * torch.sum(frac_tokens * probs.mean(dim=0)))
    return torch.stack(losses).mean()


def training_losses(model: torch.nn.Module, x: torch.Tensor, aux_coef: float,
                    balance_loss: str) -> tuple[torch.Tensor, float, float]:
    """Forward one batch and build the training objective: cross-entropy + ``aux_coef`` * balancing loss.

    Args:
        model: The MoE causal LM.
        x: ``(batch, seq_len)`` token ids (inputs and labels; the model shifts them).
        aux_coef: Load-balancing loss coefficient.
        balance_loss: ``"global"``: transformers' built-in loss (routing statistics pooled over all
            layers, added by the model itself with ``config.router_aux_loss_coef``); ``"per-layer"``:
            :func:`balance_loss_per_layer`.

    Returns:
        ``(total_loss, lm_loss, balance_loss)``; the last two as floats for logging.
    """
    cfg = model.config
    out = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
    if balance_loss == "global":  # out.loss already holds lm + coef * aux (coef from the config)
        aux = float(out.aux_loss.detach())
        return out.loss, float(out.loss.detach()) - aux_coef * aux, aux
    if model.router_aux_loss_coef != 0.0:
        raise ValueError("per-layer balancing needs the model's own aux loss off (see build_model)")
    n_exp = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    aux_t = balance_loss_per_layer(out.router_logits, n_exp, cfg.num_experts_per_tok)
    return out.loss + aux_coef * aux_t, float(out.loss.detach()), float(aux_t.detach())


def aligned_window_starts(piece_starts: torch.Tensor, stream_len: int, seq_len: int) -> torch.Tensor:
    """Window starts that put a piece's ``<|endoftext|>`` at position 0 of a window.

    Every piece starts a window; a piece longer than ``seq_len`` also starts one every ``seq_len``
    tokens after that, so every token is covered. Windows that would run past the stream's end are dropped.

    Args:
        piece_starts: Sorted positions of the pieces' separators.
        stream_len: Length of the token stream.
        seq_len: Window length.

    Returns:
        1-D tensor of window start positions.
    """
    ends = torch.cat([piece_starts[1:], torch.tensor([stream_len])])
    out: list[int] = []
    for start, end in zip(piece_starts.tolist(), ends.tolist()):
        out.extend(range(start, end, seq_len))
    starts = torch.tensor(out, dtype=torch.long)
    return starts[starts + seq_len <= stream_len]


class BatchSampler:
    """Epoch-wise shuffled, non-overlapping windows over a token stream.

    Each epoch starts at a random offset below ``seq_len``, cuts the stream into windows of
    ``seq_len`` tokens and visits them in a random order, so one epoch sees every token once. With
    ``piece_starts`` the windows are :func:`aligned_window_starts` instead (every piece begins a
    window; a window over a short piece runs on into the next one, so some tokens recur in an epoch).

    Args:
        stream: 1-D token tensor.
        seq_len: Window length.
        batch_size: Windows per batch.
        generator: Seeded generator (the only source of randomness).
    """

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator,
                 piece_starts: torch.Tensor | None = None):
        self.stream = stream
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.gen = generator
        self.epoch = 0
        self._order: list[int] = []
        self._aligned = None if piece_starts is None else aligned_window_starts(piece_starts, len(stream), seq_len)

    def _new_epoch(self) -> None:
        if self._aligned is not None:
            starts = self._aligned[torch.randperm(len(self._aligned), generator=self.gen)]
        else:
            offset = int(torch.randint(0, self.seq_len, (1,), generator=self.gen))
            n = (len(self.stream) - offset) // self.seq_len
            starts = offset + torch.randperm(n, generator=self.gen) * self.seq_len
        self._order = starts.tolist()
        self.epoch += 1

    def next(self) -> torch.Tensor:
        """Return the next ``(batch_size, seq_len)`` batch of token ids."""
        if len(self._order) < self.batch_size:
            self._new_epoch()
        starts, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return torch.stack([self.stream[s : s + self.seq_len] for s in starts])


# --------------------------------------------------------------------------------------------------
# Evaluation on the held-out split
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_split(model: torch.nn.Module, stream: torch.Tensor, seq_len: int, batch_size: int = 16) -> dict[str, Any]:
    """Token-level loss/perplexity and per-layer expert usage on non-overlapping windows.

    Args:
        model: The causal LM (an MoE from this script).
        stream: 1-D token tensor (the held-out split).
        seq_len: Window length.
        batch_size: Windows per forward pass.

    Returns:
        ``{"loss", "perplexity", "tokens", "expert_usage"}`` where ``expert_usage[l][e]`` is the fraction
        of layer ``l``'s routed (token, slot) assignments that went to expert ``e``.
    """
    was_training = model.training
    model.eval()
    cfg = model.config
    n_exp = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    top_k = cfg.num_experts_per_tok
    n_win = len(stream) // seq_len
    windows = stream[: n_win * seq_len].view(n_win, seq_len)
    counts = torch.zeros(cfg.num_hidden_layers, n_exp, dtype=torch.float64)
    nll, ntok = 0.0, 0
    for i in range(0, n_win, batch_size):
        x = windows[i : i + batch_size]
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        nll -= logp.gather(-1, x[:, 1:, None]).sum().item()
        ntok += x[:, 1:].numel()
        for layer, logits in enumerate(out.router_logits):
            idx = logits.topk(top_k, dim=-1).indices.reshape(-1)
            counts[layer] += torch.bincount(idx, minlength=n_exp).double()
    model.train(was_training)
    loss = nll / max(1, ntok)
    usage = (counts / counts.sum(dim=1, keepdim=True)).tolist()
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": ntok, "expert_usage": usage}


def usage_summary(usage: list[list[float]]) -> dict[str, Any]:
    """Summarise an expert-usage histogram.

    Args:
        usage: ``usage[layer][expert]`` fractions.

    Returns:
        Per-layer min/max fraction, max/min ratio relative to uniform, and count of unused experts.
    """
    out = []
    for row in usage:
        n = len(row)
        out.append(
            {
                "min_frac": min(row),
                "max_frac": max(row),
                "max_over_uniform": max(row) * n,
                "min_over_uniform": min(row) * n,
                "unused_experts": sum(1 for v in row if v == 0.0),
            }
        )
    return {"per_layer": out}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        The parsed namespace.
    """
    from benchmarks.files import Parser

    p = Parser("tools.train_tiny_moe", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["mixtral", "qwen-moe", "mixtral-deep", "qwen3-deep"], default="mixtral")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=640, help="optimizer steps (fixes the result)")
    p.add_argument("--max-minutes", type=float, default=55.0, help="safety wall-clock stop")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--tokenizer", type=Path, default=None, help="reuse the tokenizer saved in this dir")
    p.add_argument("--tokenizer-only", action="store_true", help="train/save the tokenizer and exit")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss coefficient")
    p.add_argument("--balance-loss", choices=["global", "per-layer"], default="global",
                   help="global: transformers' built-in loss (statistics pooled over layers); "
                        "per-layer: balance every MoE layer separately (keeps every expert of every layer used)")
    p.add_argument("--piece-chars", type=int, default=0,
                   help="re-cut training documents into paragraph-aligned pieces of about this many characters, "
                        "each after <|endoftext|>, and start every training window at a piece (0: off, the "
                        "8k-character documents and windows at random offsets); the validation split is unchanged")
    p.add_argument("--experts-impl", default="grouped_mm", choices=["eager", "batched_mm", "grouped_mm"],
                   help="experts kernel used while training (the saved config keeps stock defaults)")
    p.add_argument("--benchmark-experts", type=int, default=0, metavar="STEPS",
                   help="time STEPS training steps with each experts kernel on random tokens, then exit")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=200,
                   help="write <out>/resume_checkpoint.pt every N steps; rerunning the same command resumes "
                        "from it bit-for-bit (0: never)")
    args = p.parse_args(argv)
    if args.piece_chars < 0:
        p.error(f"--piece-chars must be 0 (off) or a positive number of characters, got {args.piece_chars}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out: {args.out} is a file; name a folder")
    from diep_lightning.export_dir import shipped_models_dir

    shipped = shipped_models_dir()
    if shipped is not None and args.out.resolve().is_relative_to(shipped.resolve()):
        p.error(f"--out: {args.out} lies inside the shipped models ({shipped}); train into a scratch folder and copy "
                "the finished model in")
    ours = (args.out / CKPT_NAME).is_file() or (args.out / "training_log.json").is_file()
    if not args.tokenizer_only and not args.benchmark_experts and not ours and any(
            (args.out / name).exists() for name in ("config.json", "model.safetensors")):
        p.error(f"--out: {args.out} holds a model this tool did not train (no training_log.json or {CKPT_NAME}), "
                "which saving would replace; choose another --out")
    return args


def benchmark_experts(args: argparse.Namespace, tokenizer: Any) -> dict[str, float]:
    """Measure training throughput (tokens/s) of each experts kernel for ``args.arch``.

    One warm-up step, then ``args.benchmark_experts`` timed forward+backward+AdamW steps on random
    tokens with the training batch shape. An implementation that fails (e.g. ``batched_mm`` running out
    of memory because it gathers one weight matrix per (token, expert) pair) is reported as 0.

    Args:
        args: Parsed command line (arch, batch size, sequence length, steps).
        tokenizer: The tokenizer (for the vocabulary).

    Returns:
        ``{implementation: tokens_per_second}``.
    """
    results: dict[str, float] = {}
    x = torch.randint(0, len(tokenizer), (args.batch_size, args.seq_len),
                      generator=torch.Generator().manual_seed(args.seed))
    for impl in ("eager", "grouped_mm", "batched_mm"):
        cfg = build_config(args.arch, tokenizer, args.seq_len, args.aux_coef)
        inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        gathered = 4 * 2 * cfg.num_hidden_layers * x.numel() * cfg.num_experts_per_tok * 3 * cfg.hidden_size * inter
        if impl == "batched_mm" and gathered > 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
            print(f"[bench] {impl} skipped: gathers ~{gathered / 2**30:.1f} GiB of per-token expert weights "
                  "(with gradients), more than half the RAM", flush=True)
            results[impl] = 0.0
            continue
        torch.manual_seed(args.seed)
        model = build_model(cfg, impl, args.balance_loss)
        opt = make_optimizer(model, args.lr, args.weight_decay)
        try:
            for i in range(args.benchmark_experts + 1):
                if i == 1:
                    t = time.time()
                loss, _, _ = training_losses(model, x, args.aux_coef, args.balance_loss)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            results[impl] = args.benchmark_experts * x.numel() / (time.time() - t)
        except (RuntimeError, MemoryError) as err:  # pragma: no cover - depends on the machine
            print(f"[bench] {impl} failed: {err}", flush=True)
            results[impl] = 0.0
        print(f"[bench] {args.arch} {impl}: {results[impl]:.0f} tok/s", flush=True)
        del model, opt
    return results


def save_model(model: torch.nn.Module, tokenizer: Any, out: Path) -> None:
    """Save model (fp32 safetensors) and tokenizer with a stock-loadable config.

    Args:
        model: The trained model.
        tokenizer: The tokenizer.
        out: Output directory.
    """
    model.set_experts_implementation("grouped_mm")  # the stock default; not written to config.json
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


CKPT_NAME = "resume_checkpoint.pt"
# Arguments that must match for a checkpoint to be resumed (everything that changes the result).
RESUME_KEYS = ("arch", "seed", "max_steps", "threads", "batch_size", "seq_len", "lr", "warmup", "weight_decay",
               "aux_coef", "experts_impl", "balance_loss", "piece_chars")


def save_checkpoint(path: Path, args: argparse.Namespace, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sampler: "BatchSampler", state: dict[str, Any]) -> None:
    """Atomically write everything needed to continue training bit-for-bit.

    Args:
        path: Checkpoint file.
        args: Parsed command line (the result-defining subset is stored and checked on resume).
        model: The model.
        opt: The optimizer.
        sampler: The batch sampler (its generator state and remaining epoch order).
        state: Loop state (step, loss history, accumulated training seconds).
    """
    payload = {
        "args": {k: getattr(args, k) for k in RESUME_KEYS},
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "sampler": {"gen": sampler.gen.get_state(), "order": sampler._order, "epoch": sampler.epoch},
        "state": state,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, args: argparse.Namespace, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sampler: "BatchSampler") -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: Checkpoint file.
        args: Parsed command line; its result-defining values must equal the stored ones.
        model: Freshly built model to load into.
        opt: Freshly built optimizer to load into.
        sampler: Freshly built sampler to restore.

    Returns:
        The loop state.

    Raises:
        ValueError: If the checkpoint was made with different arguments.
    """
    payload = torch.load(path, weights_only=False)
    mine = {k: getattr(args, k) for k in RESUME_KEYS}
    payload["args"].setdefault("balance_loss", "per-layer")  # checkpoints from before the option existed
    payload["args"].setdefault("piece_chars", 0)
    if payload["args"] != mine:
        raise ValueError(f"checkpoint {path} was made with {payload['args']}, not {mine}; delete it to restart")
    model.load_state_dict(payload["model"])
    opt.load_state_dict(payload["opt"])
    sampler.gen.set_state(payload["sampler"]["gen"])
    sampler._order = payload["sampler"]["order"]
    sampler.epoch = payload["sampler"]["epoch"]
    return payload["state"]


def run_training(args: argparse.Namespace, model: torch.nn.Module, opt: torch.optim.Optimizer,
                 sampler: "BatchSampler", val_ids: torch.Tensor, state: dict[str, Any], t0: float,
                 ckpt: Path) -> bool:
    """The optimisation loop, from ``state["step"]`` to ``args.max_steps``.

    Args:
        args: Parsed command line.
        model: The model (training mode).
        opt: The optimizer.
        sampler: The batch sampler.
        val_ids: Held-out tokens for periodic validation.
        state: Loop state, updated in place.
        t0: Process start time (for ``--max-minutes``).
        ckpt: Checkpoint path (written every ``--ckpt-every`` steps).

    Returns:
        Whether the ``--max-minutes`` safety stopped training early.
    """
    t_seg = time.time()
    seg_start_step = state["step"]
    base_seconds = state["train_seconds"]
    lm_losses = state["lm_losses"]
    while state["step"] < args.max_steps:
        step = state["step"]
        if (time.time() - t0) / 60 > args.max_minutes:
            print(f"[train] max-minutes reached at step {step}", flush=True)
            save_checkpoint(ckpt, args, model, opt, sampler, state)
            return True
        lr = lr_at(step, args.max_steps, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        x = sampler.next()
        loss, lm_loss, aux = training_losses(model, x, args.aux_coef, args.balance_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm_losses.append(lm_loss)
        state["step"] = step + 1
        state["train_seconds"] = base_seconds + time.time() - t_seg
        if (step + 1) % args.log_every == 0 or step == 0:
            seg = time.time() - t_seg
            tps = (step + 1 - seg_start_step) * x.numel() / seg
            recent = lm_losses[-args.log_every:]
            print(f"[train] step {step + 1}/{args.max_steps} lr {lr:.2e} loss {lm_loss:.4f} "
                  f"(avg {sum(recent) / len(recent):.4f}) aux {aux:.4f} tok/s {tps:.0f} "
                  f"elapsed {state['train_seconds'] / 60:.1f}m epoch {sampler.epoch}", flush=True)
            state["curve"].append({"step": step + 1, "loss": sum(recent) / len(recent), "aux": aux})
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.max_steps:
            ev = evaluate_split(model, val_ids, args.seq_len)
            state["val_curve"].append({"step": step + 1, "val_loss": ev["loss"], "val_ppl": ev["perplexity"]})
            print(f"[val] step {step + 1} loss {ev['loss']:.4f} ppl {ev['perplexity']:.2f}", flush=True)
        if args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < args.max_steps:
            save_checkpoint(ckpt, args, model, opt, sampler, state)
    return False


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run data preparation, training, held-out evaluation and saving.

    Args:
        args: Parsed command line.

    Returns:
        The training log dictionary (also written to ``<out>/training_log.json``).
    """
    from tools.machine import cpu_name

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    docs = shuffle_documents(load_documents(args.data_dir))
    tokenizer = get_tokenizer(args.tokenizer, docs)
    if args.tokenizer_only:
        tokenizer.save_pretrained(str(args.out))
        print(f"[tok] saved tokenizer ({len(tokenizer)} tokens) to {args.out}", flush=True)
        return {}
    if args.benchmark_experts:
        benchmark_experts(args, tokenizer)
        return {}
    stream = tokenize_stream(tokenizer, docs)
    n_val = int(len(stream) * VAL_FRACTION)
    train_ids, val_ids = stream[:-n_val], stream[-n_val:]
    piece_starts = None
    if args.piece_chars:
        train_ids, piece_starts = short_piece_stream(tokenizer, docs, len(train_ids), args.piece_chars)
        print(f"[data] training part re-cut into {len(piece_starts)} pieces of <= ~{args.piece_chars} chars "
              f"({len(train_ids)} tokens)", flush=True)
    print(f"[data] {len(docs)} docs, {len(stream)} tokens: train {len(train_ids)}, val {len(val_ids)} "
          f"({time.time() - t0:.0f}s)", flush=True)

    config = build_config(args.arch, tokenizer, args.seq_len, args.aux_coef)
    model = build_model(config, args.experts_impl, args.balance_loss)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[model] {type(model).__name__}: {n_params / 1e6:.3f}M params, experts impl "
          f"{model.config._experts_implementation}", flush=True)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    sampler = BatchSampler(train_ids, args.seq_len, args.batch_size, torch.Generator().manual_seed(args.seed),
                           piece_starts)

    state: dict[str, Any] = {"step": 0, "lm_losses": [], "curve": [], "val_curve": [], "train_seconds": 0.0,
                             "segments": 0}
    ckpt = args.out / CKPT_NAME
    if ckpt.is_file():
        state = load_checkpoint(ckpt, args, model, opt, sampler)
        print(f"[ckpt] resumed from {ckpt} at step {state['step']}", flush=True)
    state["segments"] += 1
    stopped_by_time = run_training(args, model, opt, sampler, val_ids, state, t0, ckpt)
    lm_losses, curve, val_curve = state["lm_losses"], state["curve"], state["val_curve"]
    steps_done = state["step"]
    train_seconds = state["train_seconds"]

    ev = evaluate_split(model, val_ids, args.seq_len)
    print(f"[val] final loss {ev['loss']:.4f} ppl {ev['perplexity']:.2f}", flush=True)
    save_model(model, tokenizer, args.out)
    log = {
        "arch": args.arch,
        "model_class": type(model).__name__,
        "seed": args.seed,
        "threads": args.threads,
        "max_steps": args.max_steps,
        "steps": steps_done,
        "stopped_by_time_limit": stopped_by_time,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_seen": steps_done * args.batch_size * args.seq_len,
        "epochs_started": sampler.epoch,
        "train_tokens_available": len(train_ids),
        "val_tokens": len(val_ids),
        "params": n_params,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "router_aux_loss_coef": args.aux_coef,
        "balance_loss": args.balance_loss,
        "piece_chars": args.piece_chars,
        "train_windows_per_epoch": len(sampler._aligned) if sampler._aligned is not None else None,
        "experts_implementation_for_training": args.experts_impl,
        "train_wall_seconds": train_seconds,
        "process_segments": state["segments"],
        "total_wall_seconds": time.time() - t0,
        "final_train_loss_last50": sum(lm_losses[-50:]) / len(lm_losses[-50:]),
        "val_loss": ev["loss"],
        "val_perplexity": ev["perplexity"],
        "val_expert_usage": ev["expert_usage"],
        "val_expert_usage_summary": usage_summary(ev["expert_usage"]),
        "loss_curve": curve,
        "val_curve": val_curve,
        "data": {
            "data_dir": "train_corpus of the shared data dir (eval/ and calibration/ never read)",
            "documents": len(docs),
            "shuffle_seed": DATA_SHUFFLE_SEED,
            "val_split": "last 1% of the shuffled token stream",
        },
        "torch_version": torch.__version__,
        "cpu": cpu_name(),  # speed differs about 2.4x between the CPUs this project has run on
        "command": shlex.join(["python3", *sys.argv]),
    }
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    if ckpt.is_file() and not stopped_by_time:
        ckpt.unlink()
    print(f"[done] saved to {args.out} in {(time.time() - t0) / 60:.1f} min", flush=True)
    return log


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
