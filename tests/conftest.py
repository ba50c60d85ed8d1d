"""Shared pytest fixtures (offline: no hub access)."""

from __future__ import annotations

import json
import os

import pytest

from diep_lightning.testing import save_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A ~300-token byte-level BPE tokenizer trained offline on the bundled C4 sample.

    Returns a ``transformers`` fast tokenizer loaded back from disk, so ``tiny_tokenizer.name_or_path``
    is a directory that can be passed wherever a tokenizer path is expected. ``<|endoftext|>`` is
    BOS/EOS/UNK, ``<pad>`` is the pad token; ``len(tiny_tokenizer)`` is the vocab size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from diep_lightning.data import BUNDLED_C4_PATH

    with BUNDLED_C4_PATH.open(encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for _, line in zip(range(20), fh)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    fast.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Mixtral (8 experts, top-2, 2 layers) saved with the tiny tokenizer."""
    return save_tiny_model("mixtral", str(tmp_path_factory.mktemp("tiny_mixtral")), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Qwen2-MoE (8 experts, top-2, shared expert) saved with the tiny tokenizer."""
    return save_tiny_model("qwen2_moe", str(tmp_path_factory.mktemp("tiny_qwen")), tiny_tokenizer)
