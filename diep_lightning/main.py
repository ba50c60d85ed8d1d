"""Command-line entry point: ``python -m diep_lightning fit --config configs/tiny_mixtral.yaml``.

One LightningCLI call. Callbacks (pruning, merging, skipping, lm-eval) come from the YAML's
``trainer.callbacks`` or the command line (``--trainer.callbacks+=ExpertMerging``).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI

from diep_lightning.data import CalibrationDataModule
from diep_lightning.module import DiEPModule


class DiEPCLI(LightningCLI):
    """LightningCLI with the tokenizer of the calibration data tied to the model being pruned."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")


def main(args: list[str] | None = None) -> DiEPCLI:
    """Run the CLI (``args=None`` reads ``sys.argv``); tests call ``main([...])``."""
    import diep_lightning.callbacks  # noqa: F401  (registers the callbacks for short names on the CLI)

    return DiEPCLI(
        DiEPModule,
        CalibrationDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
