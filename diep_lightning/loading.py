"""The one place a source model, its config and its tokenizer are read, with every check that protects a run
from a wrong or damaged model: a path that does not exist, weights that do not match the config, non-finite
weights, and a cheap fingerprint that lets a resumed search prove it is pruning the same model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Bytes read from each end of every weight file for the fingerprint (the safetensors header and the last tensors).
_FINGERPRINT_SPAN = 1 << 20
#: Blocks of 4 KiB read at evenly spaced offsets through every weight file: any change that spans more than
#: 1/_FINGERPRINT_BLOCKS of a file (88 MB of a 90 GB checkpoint: less than one Mixtral-8x7B expert matrix) is seen,
#: at the cost of reading 4 MiB more per file (hashing whole files of a 47B model would take minutes).
_FINGERPRINT_BLOCKS = 1024
_FINGERPRINT_BLOCK = 4096


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model_path(model_name_or_path: str) -> str:
    """Return a local directory or a hub id; fail in one line when a local-looking path does not exist."""
    path = Path(os.path.expanduser(str(model_name_or_path)))
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"model_name_or_path: {model_name_or_path!r} is a file; point it at a model "
                                     "directory (with config.json)")
        if not (path / "config.json").is_file():
            raise ValueError(f"model_name_or_path: {model_name_or_path!r} has no config.json; point it at a "
                             "Hugging Face model directory")
        return str(path)
    text = str(model_name_or_path)
    first = text.split("/", 1)[0]
    looks_local = (text.startswith((".", "/", "~")) or text.count("/") != 1 or Path(first).is_dir()
                   or _offline())
    if looks_local:
        raise FileNotFoundError(f"model_name_or_path: {text!r} does not exist; give a model directory"
                                + ("" if _offline() else " or a hub id 'org/name'"))
    return text


def load_config(model_name_or_path: str, trust_remote_code: bool = False) -> Any:
    """Load only the config (cheap), so that bad input fails before weights are read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"model_name_or_path: cannot load a config from {model_name_or_path!r} ({first})") from None


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a local model directory (safetensors or PyTorch bins), sorted."""
    root = Path(path)
    return sorted([*root.glob("*.safetensors"), *root.glob("*.bin")])


def check_weight_files(path: str | os.PathLike) -> None:
    """Refuse, in one line naming the file, a safetensors file that is cut short or whose header is not valid, and a
    shard the index names but the folder lacks: read from the headers alone, so it costs the same at 90 GB."""
    import json
    import struct

    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index.name}: {index} is not a safetensors index (no weight_map); the export is "
                             "damaged; re-export it") from None
        missing = sorted(name for name in shards if not (root / str(name)).is_file())
        if missing:
            raise ValueError(f"{index.name}: names {missing[0]}, which {root} lacks; the export is incomplete")
    for file in sorted(root.glob("*.safetensors")):
        size = file.stat().st_size
        with file.open("rb") as fh:
            head = fh.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            try:
                header = json.loads(fh.read(length)) if 0 < length <= size - 8 else None
                end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"] or [0])
            except (ValueError, KeyError, TypeError, AttributeError, IndexError):
                header = None
        if header is None or 8 + length + end != size:
            raise ValueError(f"{file.name}: {file} is cut short or damaged (its header does not fit its {size:,} "
                             "bytes); copy or export it again")


def fingerprint(model_name_or_path: str) -> str | None:
    """A short hash of a local model's config.json and weight files: sizes, the first and last MiB of each file
    (the safetensors header: every tensor's name, shape and offset) and 1024 blocks of 4 KiB evenly spaced
    through it; None for a hub id. A change that spans more than a 1024th of a file is always seen; a change of a
    few weights between two sampled blocks is not."""
    root = Path(model_name_or_path)
    if not root.is_dir():
        return None
    digest = hashlib.sha256((root / "config.json").read_bytes() if (root / "config.json").is_file() else b"")
    for file in weight_files(root):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as fh:
            digest.update(fh.read(_FINGERPRINT_SPAN))
            if size > 2 * _FINGERPRINT_SPAN:
                fh.seek(size - _FINGERPRINT_SPAN)
                digest.update(fh.read(_FINGERPRINT_SPAN))
                step = max(size // _FINGERPRINT_BLOCKS, 1)
                for offset in range(0, size, step):
                    fh.seek(offset)
                    digest.update(fh.read(_FINGERPRINT_BLOCK))
    return digest.hexdigest()[:16]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def load_model(model_name_or_path: str, *, dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
               experts_implementation: str | None = None, model_cls: Any = None, argument: str = "model_name_or_path",
               **kwargs: Any) -> nn.Module:
    """Load a causal LM in eval mode and refuse it, in one line naming ``argument``, when its weight files are
    unreadable, do not match its config (missing or wrongly shaped tensors) or hold non-finite values."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = DTYPES[dtype] if dtype in DTYPES else getattr(torch, dtype)
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    cls = model_cls or AutoModelForCausalLM
    try:
        model, info = cls.from_pretrained(model_name_or_path, dtype=dtype or "auto", trust_remote_code=trust_remote_code,
                                          output_loading_info=True, **kwargs)
    except OSError as err:
        if getattr(err, "errno", None) is not None:
            raise  # an environment fault (disk, permissions), reported as such
        raise ValueError(f"{argument}: cannot read the weights in {model_name_or_path} ({_first_line(err)}); the "
                         "files are damaged or incomplete") from None
    except Exception as err:  # safetensors and torch raise their own types for damaged files
        raise ValueError(f"{argument}: cannot read the weights in {model_name_or_path} ({type(err).__name__}: "
                         f"{_first_line(err)}); the files are damaged or do not match config.json") from None
    problems = {k: sorted(v)[:3] for k, v in info.items() if v and k in ("missing_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"{argument}: the weights in {model_name_or_path} do not match its config.json "
                         f"({problems}); the files are incomplete or belong to another model")
    model.eval()
    check_finite(model, argument)
    return model


def check_finite(model: nn.Module, argument: str = "model_name_or_path") -> None:
    """Refuse a model with NaN/inf weights, naming the MoE layer and expert when the tensor is an expert's."""
    from diep_lightning.families import get_family
    from diep_lightning.families.registry import is_supported

    owners: dict[int, tuple[Any, str]] = {}
    if is_supported(model.config):
        for block in get_family(model).blocks(model):
            for name, param in block.experts.named_parameters():
                owners[id(param)] = (block, name)
    for name, param in model.named_parameters():
        if not param.is_floating_point() or param.device.type == "meta" or bool(torch.isfinite(param).all()):
            continue
        owner = owners.get(id(param))
        if owner is not None and param.dim() > 1 and param.shape[0] == owner[0].num_experts:
            block = owner[0]
            bad = (~torch.isfinite(param.detach().reshape(param.shape[0], -1))).any(1).nonzero().flatten().tolist()
            raise ValueError(f"{argument}: non-finite weights (NaN/inf) in MoE layer {block.index} (decoder layer "
                             f"{block.layer_idx}), expert(s) {bad}, tensor {name}; the checkpoint is damaged; repair "
                             "or re-download it")
        raise ValueError(f"{argument}: non-finite weights (NaN/inf) in {name}; the checkpoint is damaged; repair or "
                         "re-download it")


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False, required: bool = False) -> Any:
    """The tokenizer stored with a model; None when it has none (or an error naming the path if ``required``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except Exception as err:  # tokenizers raises bare Exceptions with cut-off messages
        if not required:
            return None
        raise ValueError(f"tokenizer: could not load a tokenizer from {model_name_or_path!r} ({_first_line(err)}); save "
                         "the tokenizer files (tokenizer.json, tokenizer_config.json) with the model or point "
                         "data.tokenizer at a tokenizer directory") from None


def load_causal_lm(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, device: Any = None,
                   trust_remote_code: bool = False) -> nn.Module:
    """Load any model this project reads or writes: a diep_lightning export (with its per-layer expert counts
    and skipping, through :func:`load_pruned`) or a plain transformers model."""
    from diep_lightning.export_dir import PRUNING_FILE

    path = resolve_model_path(os.fspath(path))
    if (Path(path) / PRUNING_FILE).is_file():
        return load_pruned(path, dtype=dtype, device=device)
    model = load_model(path, dtype=dtype, trust_remote_code=trust_remote_code, argument="model")
    return model.to(device) if device is not None else model


def load_pruned(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None, skipping: bool = True,
                device: str | torch.device | None = None) -> nn.Module:
    """Load a diep_lightning export as a transformers model (no remote code needed).

    Args:
        path: export directory.
        dtype: weights' dtype (default: as saved).
        skipping: re-install adaptive expert skipping when the export has calibrated gammas.
        device: where to put the model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from diep_lightning.pruned_model import pruned_model_class
    from diep_lightning.record import read_pruning_record
    from diep_lightning.removal import is_uniform

    path = Path(path)
    record = read_pruning_record(path)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "auto_map"):  # load in-process, never through the export's remote code
        del config.auto_map
    spec = getattr(config, "diep_layers", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if spec and not is_uniform(spec):
        model_cls = pruned_model_class(config)
    else:
        model_cls = AutoModelForCausalLM
    model, info = model_cls.from_pretrained(path, config=config, dtype=dtype or "auto", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"path: the weights in {path} do not match its recorded layout ({problems}); the export "
                         "is incomplete or was modified; re-export it")
    model.eval()
    if device is not None:
        model.to(device)
    if skipping:
        from diep_lightning.skipping import install_skipping_from_record

        install_skipping_from_record(model, record)
    return model
