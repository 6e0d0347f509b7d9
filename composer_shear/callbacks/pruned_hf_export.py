"""Callback ``pruned_hf_export``: write the compact Hugging Face model during / after pruning."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist

from composer_shear.export import DTYPES, export_model, find_gated_hf_model

__all__ = ["PrunedHFExport"]

log = logging.getLogger(__name__)


def _full_params(model):
    """Context that gathers FSDP-sharded parameters onto rank 0 (no-op without FSDP)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if any(isinstance(module, FSDP) for module in model.modules()):
        return FSDP.summon_full_params(model, writeback=False, rank0_only=True, offload_to_cpu=True)
    return contextlib.nullcontext()


class PrunedHFExport(Callback):
    """Exports the pruned model as a Hugging Face directory at fit end (and every ``interval``).

    Rank 0 applies the deterministic masks, folds and slices (see
    :mod:`composer_shear.surgery`) and writes config, safetensors, tokenizer and generation
    config atomically; under FSDP the parameters are gathered to rank 0 first.

    YAML::

        callbacks:
          pruned_hf_export:
            save_folder: ./runs/{run_name}/pruned_hf   # final export
            interval: 500ba                            # optional: also <save_folder>_ba<N>
            dtype: bfloat16                            # optional, default: model dtype

    Args:
        save_folder: Output directory of the final export; ``{run_name}`` is substituted.
        interval: Also export every this many batches (``"500ba"`` or an int), to
            ``<save_folder>_ba<N>``. None: only at fit end.
        dtype: Dtype of the written weights (``float32``, ``bfloat16``, ``float16``).
        overwrite: Replace existing export directories (default True: a rerun refreshes).
    """

    def __init__(
        self,
        save_folder: str = "./{run_name}/pruned_hf",
        interval: str | int | None = None,
        dtype: str | None = None,
        overwrite: bool = True,
    ):
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if isinstance(interval, int):
            interval = f"{interval}ba"
        self.interval = Time.from_timestring(interval) if interval else None
        if self.interval is not None and self.interval.unit != TimeUnit.BATCH:
            raise ValueError("pruned_hf_export interval must be in batches, e.g. '500ba'.")
        self.save_folder = save_folder
        self.dtype = DTYPES[dtype] if dtype else None
        self.overwrite = overwrite
        self.exported: list[Path] = []

    def _folder(self, state: State, suffix: str = "") -> Path:
        return Path(self.save_folder.format(run_name=state.run_name) + suffix)

    def fit_start(self, state: State, logger: Logger) -> None:
        """Fails fast when there are no gates to export."""
        if find_gated_hf_model(state.model) is None:
            raise RuntimeError(
                "pruned_hf_export needs the targeted_pruning algorithm in the same run."
            )

    def batch_end(self, state: State, logger: Logger) -> None:
        """Periodic export."""
        if self.interval is None:
            return
        batch = int(state.timestamp.batch)
        if batch % int(self.interval.value) == 0:
            self._export(state, logger, self._folder(state, f"_ba{batch}"))

    def fit_end(self, state: State, logger: Logger) -> None:
        """Final export."""
        self._export(state, logger, self._folder(state))

    def _export(self, state: State, logger: Logger, folder: Path) -> None:
        error: Exception | None = None
        with _full_params(state.model):
            if dist.get_global_rank() == 0:
                try:
                    self._export_rank0(state, logger, folder)
                except Exception as exc:  # re-raised below, after the other ranks know
                    error = exc
        # Every rank learns whether rank 0 succeeded, so none waits forever on a failed export.
        status = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(status, src=0)
        if error is not None:
            raise error
        if status[0] is not None:
            raise RuntimeError(f"pruned_hf_export failed on rank 0: {status[0]}")

    def _export_rank0(self, state: State, logger: Logger, folder: Path) -> None:
        hf_model = find_gated_hf_model(state.model)
        tokenizer = getattr(_composer_model(state.model), "tokenizer", None)
        summary = export_model(
            hf_model, folder, tokenizer, overwrite=self.overwrite, dtype=self.dtype
        )
        self.exported.append(summary.out_dir)
        log.info("pruned_hf_export:\n%s", summary.describe())
        logger.log_metrics({"pruned_hf_export/num_params": float(summary.target.num_params())})


def _composer_model(model):
    # Unwrap DDP (`.module`) to reach Composer's HuggingFaceModel, which holds the tokenizer.
    while hasattr(model, "module") and not hasattr(model, "tokenizer"):
        model = model.module
    return model
