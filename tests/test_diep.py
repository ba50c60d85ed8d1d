"""The DiEP search: losses, alternating phases, frozen weights, tiny checkpoints, resume, FSDP2 on CPU."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import fit_args

from diep_lightning.main import main
from diep_lightning.methods.diep import DiEPModule, parse_ratio


def _checkpoint(root) -> dict:
    paths = sorted(glob.glob(os.path.join(root, "**", "*.ckpt"), recursive=True))
    assert paths, f"no checkpoint under {root}"
    return torch.load(paths[-1], map_location="cpu", weights_only=False)


def test_n_softmax_relaxed_model_equals_original_at_initialisation(tiny_mixtral_dir):
    module = DiEPModule(tiny_mixtral_dir, alpha_scaling="n_softmax")
    module.configure_model()
    batch = {"input_ids": torch.randint(3, 200, (2, 16))}
    losses = module.compute_losses(batch)
    assert losses["reconstruction"].item() == 0.0
    with torch.no_grad(), module._scaling.disabled():
        plain = module.model(**batch).logits
    with torch.no_grad():
        scaled = module.model(**batch).logits
    assert torch.equal(plain, scaled)
    assert not any(p.requires_grad for p in module.model.parameters())
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == 8 * 2 + 2


def test_default_is_paper_literal_alpha_scaling_that_shrinks_outputs(tiny_mixtral_dir):
    module = DiEPModule(tiny_mixtral_dir)
    assert module.hparams.alpha_scaling == "softmax"
    module.configure_model()
    losses = module.compute_losses({"input_ids": torch.randint(3, 200, (2, 16))})
    assert losses["reconstruction"].item() > 0
    # every expert of a block starts at 1/N of its routing weight
    assert torch.allclose(module.expert_scale(0), torch.full((8,), 1 / 8))


def test_default_optimizers_adam_for_alpha_plain_gradient_steps_for_beta(tiny_mixtral_dir):
    """Adam's per-parameter normalisation would move every beta alike; SGD keeps layer differences."""
    module = DiEPModule(tiny_mixtral_dir)
    module.configure_model()
    (opt_alpha, opt_beta), _ = module.configure_optimizers()
    assert isinstance(opt_alpha, torch.optim.Adam) and opt_alpha.param_groups[0]["lr"] == 2e-2
    assert isinstance(opt_beta, torch.optim.SGD) and opt_beta.param_groups[0]["lr"] == 1.0
    # two layers with gradients of different size move by different amounts under the default beta optimizer
    module.beta[0].grad, module.beta[1].grad = torch.tensor(-0.5), torch.tensor(-0.05)
    opt_beta.step()
    assert module.beta[0].item() - 1 == pytest.approx(0.5) and module.beta[1].item() - 1 == pytest.approx(0.05)


@pytest.mark.parametrize("ratio,expected", [("3:1", (3, 1)), ("1:1", (1, 1)), ([2, 0], (2, 0))])
def test_parse_ratio(ratio, expected):
    assert parse_ratio(ratio) == expected


@pytest.mark.parametrize("bad", ["3", "a:b", "3:1:1", "-1:2", "0:0"])
def test_parse_ratio_rejects(bad):
    with pytest.raises(ValueError, match="alpha_beta_ratio"):
        parse_ratio(bad)


def test_fit_moves_alpha_and_beta_logs_and_checkpoints_only_trainable_state(tiny_mixtral_dir, tmp_path):
    root = str(tmp_path / "run")
    main(fit_args(tiny_mixtral_dir, root, "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={root}"))
    ckpt = _checkpoint(root)
    state = ckpt["state_dict"]
    assert set(state) == {"alpha_logits.0", "alpha_logits.1", "beta.0", "beta.1"}
    assert any(state[f"alpha_logits.{i}"].abs().max() > 0 for i in range(2))
    assert any((state[f"beta.{i}"] - 1).abs() > 0 for i in range(2))
    assert ckpt["global_step"] == 8  # 4 batches x 2 epochs, one optimizer step each
    paths = glob.glob(os.path.join(root, "**", "*.ckpt"), recursive=True)
    assert os.path.getsize(paths[0]) < 64_000, "a checkpoint must not contain the frozen model"
    metrics = open(glob.glob(os.path.join(root, "**", "metrics.csv"), recursive=True)[0]).readline()
    for name in ["train/ce_step", "train/reconstruction_step", "train/loss_step", "beta/layer_0",
                 "alpha_entropy/layer_1", "lr/alpha", "lr/beta"]:
        assert name in metrics


def test_alternation_follows_the_ratio(tiny_mixtral_dir, tmp_path):
    root = str(tmp_path / "run")
    main(fit_args(tiny_mixtral_dir, root, "--model.alpha_beta_ratio=1:0", epochs=1))
    state = _checkpoint(root)["state_dict"]
    assert all(state[f"beta.{i}"].item() == 1.0 for i in range(2)), "beta must not move with ratio 1:0"
    assert state["alpha_logits.0"].abs().max() > 0


def test_resume_continues_the_same_schedule(tiny_qwen_dir, tmp_path):
    straight = str(tmp_path / "straight")
    keep_all = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_top_k=-1",
                f"--trainer.callbacks.dirpath={tmp_path / 'every_epoch'}"]
    main(fit_args(tiny_qwen_dir, straight, *keep_all, epochs=2))
    first_epoch = glob.glob(str(tmp_path / "every_epoch" / "epoch=0*.ckpt"))
    assert len(first_epoch) == 1
    resumed = str(tmp_path / "resumed")
    main(fit_args(tiny_qwen_dir, resumed, f"--ckpt_path={first_epoch[0]}", epochs=2))
    a = torch.load(glob.glob(str(tmp_path / "every_epoch" / "epoch=1*.ckpt"))[0], weights_only=False)
    b = _checkpoint(resumed)
    assert a["global_step"] == b["global_step"] == 8
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], atol=1e-6, rtol=0)


FSDP2 = ["--trainer.strategy=diep_lightning.strategy.DiEPModelParallelStrategy",
         "--trainer.strategy.process_group_backend=gloo"]


def _fsdp_run(model_dir: str, root: str, devices: int, batch: int, strategy: list[str] = FSDP2) -> dict:
    args = fit_args(model_dir, root, "--data.shuffle=false", epochs=1)
    args = [a for a in args if not a.startswith(("--trainer.devices", "--data.batch_size"))]
    args += [f"--trainer.devices={devices}", f"--data.batch_size={batch}", *strategy]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "diep_lightning", *args], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return _checkpoint(root)


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_processes_match_one_process(strategy, tiny_mixtral_dir, tmp_path):
    single = str(tmp_path / "single")
    main(fit_args(tiny_mixtral_dir, single, "--data.shuffle=false", epochs=1))
    flags = FSDP2 if strategy == "fsdp2" else ["--trainer.strategy=ddp"]
    two = _fsdp_run(tiny_mixtral_dir, str(tmp_path / "fsdp2"), devices=2, batch=2, strategy=flags)
    one = _checkpoint(single)
    assert two["global_step"] == one["global_step"]
    for key in one["state_dict"]:
        torch.testing.assert_close(two["state_dict"][key], one["state_dict"][key], atol=1e-5, rtol=1e-4)
    assert os.path.getsize(glob.glob(os.path.join(str(tmp_path / "fsdp2"), "**", "*.ckpt"), recursive=True)[0]) < 64_000


def test_teacher_cache_gives_the_same_search(tiny_mixtral_dir, tmp_path):
    cached, plain = str(tmp_path / "cached"), str(tmp_path / "plain")
    cli = main(fit_args(tiny_mixtral_dir, cached, epochs=2))
    assert len(cli.model._teacher_cache) == 16, "every calibration sample's teacher outputs are cached"
    main(fit_args(tiny_mixtral_dir, plain, "--model.teacher_cache_gb=0", epochs=2))
    host = str(tmp_path / "host")
    cli = main(fit_args(tiny_mixtral_dir, host, "--model.teacher_cache_device=cpu", epochs=2))
    assert {t.device.type for row in cli.model._teacher_cache.values() for t in row.values()} == {"cpu"}
    a, b, c = (_checkpoint(root)["state_dict"] for root in (cached, plain, host))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
        torch.testing.assert_close(c[key], b[key], atol=1e-6, rtol=0)


def test_the_teacher_cache_limit_counts_this_ranks_samples(tiny_mixtral_dir):
    """Under DDP a rank caches only its own share, so a limit that holds that share but not every sample keeps
    the cache on: here 16 samples on 2 ranks, with room for 8 samples' outputs."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from diep_lightning.data import RankShardSampler, TokenBlockDataset

    module = DiEPModule(tiny_mixtral_dir)
    dataset = TokenBlockDataset(torch.zeros(16, 4, dtype=torch.long))
    batch = {"input_ids": torch.zeros(4, 4, dtype=torch.long), "sample_index": torch.arange(4)}
    teacher = {0: torch.zeros(4, 16, 8)}  # 512 bytes per sample
    rank_loader = DataLoader(dataset, batch_size=4, sampler=RankShardSampler(dataset, num_replicas=2, rank=0))
    module._trainer = SimpleNamespace(train_dataloader=rank_loader)
    module.hparams.teacher_cache_gb = 512 * 8 / 2**30
    assert module._cache_fits(batch, teacher)
    module._trainer = SimpleNamespace(train_dataloader=DataLoader(dataset, batch_size=4))  # one process: all 16
    assert not module._cache_fits(batch, teacher)
    module._trainer = None


def test_a_search_without_a_logger_skips_the_per_layer_metrics(tiny_mixtral_dir, tmp_path):
    """Per-layer beta and alpha entropy cost a host transfer each step; with nothing to log them to they are not
    computed, while the losses still reach the callbacks."""
    import lightning.pytorch as pl

    from diep_lightning.data import CalibrationDataModule

    module = DiEPModule(tiny_mixtral_dir)
    data = CalibrationDataModule(tokenizer=tiny_mixtral_dir, num_samples=8, seq_len=16, batch_size=4)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, data)
    assert "train/loss_step" in trainer.callback_metrics
    assert not any(k.startswith(("beta/", "alpha_entropy/")) for k in trainer.callback_metrics)


def test_sample_ids_stay_on_the_host_and_a_step_reads_them_once(tiny_mixtral_dir, tmp_path):
    """The teacher cache is looked up by sample id every step; ids on an accelerator would cost a device wait per
    sample. The batch moves without them, and a step's host reads (``.item()``-like ops, a device wait each when
    the tensor is on a GPU) do not grow with the batch."""
    import lightning.pytorch as pl
    from torch.utils._python_dispatch import TorchDispatchMode

    from diep_lightning.data import CalibrationDataModule

    module = DiEPModule(tiny_mixtral_dir)
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "sample_index": torch.arange(2)}
    moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["input_ids"].device.type == "meta" and moved["sample_index"].device.type == "cpu"

    class Reads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.reads += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    class CountSecondEpoch(pl.Callback):  # the teacher comes from the cache from the second epoch on
        reads: list[int] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 1:
                self.mode = Reads().__enter__()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1:
                self.mode.__exit__(None, None, None)
                self.reads.append(self.mode.reads)

    import warnings

    from lightning.pytorch.trainer.connectors.data_connector import warning_cache

    warning_cache.clear()  # Lightning warns once per process
    counts, seen = {}, []
    for batch_size in (2, 8):
        counter = CountSecondEpoch()
        counter.reads = []
        data = CalibrationDataModule(tokenizer=tiny_mixtral_dir, num_samples=8, seq_len=16, batch_size=batch_size)
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                             callbacks=[counter])
        module = DiEPModule(tiny_mixtral_dir)
        with warnings.catch_warnings(record=True) as caught:
            trainer.fit(module, data)
        seen += [str(w.message) for w in caught]
        assert len(module._teacher_cache) == 8
        counts[batch_size] = max(counter.reads)  # an alpha step (Adam reads its step counter, a host tensor)
    assert counts[2] == counts[8], counts
    assert not [m for m in seen if "transfer_batch_to_device" in m]  # the hook is ours to use: no warning about it


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_router_calibration_in_two_processes_equals_one_process(strategy, tiny_mixtral_dir, tmp_path):
    """Rank 0 calibrates the full model after a sharded or replicated search: the export equals one process's."""
    def prune_args(export):
        return ["--trainer.callbacks+=GlobalExpertPruning", "--trainer.callbacks.sparsity=0.25",
                f"--trainer.callbacks.export_dir={export}", "--trainer.callbacks+=RouterCalibration",
                "--trainer.callbacks.steps=12", "--trainer.callbacks.eval_every=4", "--trainer.callbacks.batch_size=2"]

    main(fit_args(tiny_mixtral_dir, str(tmp_path / "single"), "--data.shuffle=false", *prune_args(tmp_path / "one"),
                  epochs=1))
    flags = FSDP2 if strategy == "fsdp2" else ["--trainer.strategy=ddp"]
    args = fit_args(tiny_mixtral_dir, str(tmp_path / "two_runs"), "--data.shuffle=false", epochs=1)
    args = [a for a in args if not a.startswith(("--trainer.devices", "--data.batch_size"))]
    args += ["--trainer.devices=2", "--data.batch_size=2", *flags, *prune_args(tmp_path / "two")]
    result = subprocess.run([sys.executable, "-m", "diep_lightning", *args], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "pruning.json").read_text()) for d in ("one", "two"))
    assert [layer["kept"] for layer in one["layers"]] == [layer["kept"] for layer in two["layers"]]
    a, b = one["plan"]["router_calibration"], two["plan"]["router_calibration"]
    assert a["steps_run"] == b["steps_run"] and a["parameter_names"] == b["parameter_names"]
    assert abs(a["heldout_kl_after"] - b["heldout_kl_after"]) <= 1e-4 * max(1.0, a["heldout_kl_after"])
    from diep_lightning import load_pruned

    w1, w2 = (dict(load_pruned(str(tmp_path / d)).named_parameters()) for d in ("one", "two"))
    for name in a["parameter_names"]:
        torch.testing.assert_close(w1[name], w2[name], atol=1e-4, rtol=1e-3)
