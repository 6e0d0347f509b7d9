"""Callback ``pruned_hf_export``: write the compact Hugging Face model during / after pruning."""

from __future__ import annotations

import datetime
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from composer.core import Callback, State, Time, TimeUnit
from composer.loggers import Logger
from composer.utils import dist, parse_uri, reproducibility
from composer.utils.checkpoint import get_save_filename
from torch.distributed import checkpoint as dist_cp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from composer_shear.data.descriptors import bound_open_files
from composer_shear.export.checkpoint import MODEL_PREFIX, export_model, gated_model_from_weights
from composer_shear.export.writer import DTYPES
from composer_shear.output_paths import (
    EXPORT_RECORD,
    OutputPathError,
    check_output_dir,
    check_remote_output,
    delete_remote,
    is_ours,
    is_remote,
    list_remote,
    recover_interrupted,
)
from composer_shear.pruning.algorithm import TargetedPruning
from composer_shear.pruning.masking import find_gated_hf_model, find_gates
from composer_shear.sharding import full_state_dict, is_sharded

__all__ = ["PrunedHFExport"]

log = logging.getLogger(__name__)

KEY = "callbacks.pruned_hf_export"
# Two hours: a 70B bf16 export (~140 GB) at 100 MB/s to a shared filesystem takes ~25 minutes,
# and the CPU rebuild and slicing on rank 0 come on top.
DEFAULT_EXPORT_TIMEOUT = 7200.0


class PrunedHFExport(Callback):
    """Exports the pruned model as a Hugging Face directory at fit end and every ``save_interval``.

    Rank 0 applies the deterministic masks, folds and slices (see
    :mod:`composer_shear.export.surgery`) and writes config, safetensors, tokenizer and generation
    config atomically. Under FSDP (1 or 2) the full state dict is first gathered to rank 0's
    CPU, tensor by tensor, and rank 0 rebuilds the gated model from it.

    How long it takes, and which timeout applies: the gather is a collective of the default
    process group, so it is bounded by the job's ``dist_timeout`` (LLM Foundry's default
    600 s), and it is quick (the model's weights once over the interconnect). The rebuild, the
    slicing and the write run on rank 0 alone and take about the written bytes over the disk
    speed: in bf16 a 2.7B export (pruned from 7B) is ~5.4 GB and a 7B-sized one ~14 GB, 1-3
    minutes to a local NVMe disk, 5-15 minutes to a shared filesystem at 20-50 MB/s; a
    70B-sized one ~10 times that. Meanwhile the other ranks wait on a separate gloo process
    group created at ``INIT`` with ``export_timeout`` seconds, never in a collective of the
    default group, and every rank returns to training (or to Composer's own end-of-run
    collectives) together once rank 0 is done. The same holds for periodic exports and the
    rescue checkpoint.

    The export folders are checked at ``Event.INIT`` (creatable, writable; an existing
    non-empty folder is replaced only if it is an earlier export of ours and ``overwrite`` is
    set, any other is refused), so a bad ``save_folder`` stops the run before training. If
    the final export still fails, the trained state is first saved as a Composer checkpoint
    (next to the export folder, else in the temp folder) and the error says how to export it
    with ``composer-shear export``. A failed periodic export is logged; training goes on.

    The keys follow LLM Foundry's ``hf_checkpointer`` (``save_interval``, ``precision``);
    the older ``interval`` and ``dtype`` still work, with a deprecation warning.

    YAML::

        callbacks:
          pruned_hf_export:
            save_folder: ./runs/{run_name}/pruned_hf   # final export
            save_interval: 500ba                       # optional: also <save_folder>_ba<N>
            save_num_checkpoints_to_keep: 2            # optional: keep the 2 newest of those
            precision: bfloat16                        # optional, default: model dtype

    Args:
        save_folder: Output directory of the final export; ``{run_name}`` is substituted.
            An object-store URI (``s3://bucket/run/pruned_hf``) works as for LLM Foundry's
            ``hf_checkpointer``: the export is staged locally and uploaded through Composer's
            object store; the folder is checked (reachable, empty or ours) at ``INIT``.
        save_interval: Also export every this many batches (``"500ba"``, an int or a
            ``Time`` in batches), to ``<save_folder>_ba<N>``. None: only at fit end.
        precision: Dtype of the written weights (``float32``, ``bfloat16``, ``float16``).
            None: the model's dtype.
        overwrite: Replace existing export directories written by an earlier export
            (default True: a rerun refreshes). A folder holding anything else is never
            replaced.
        save_num_checkpoints_to_keep: How many periodic exports of this run to keep (the
            newest); older ones are deleted once a newer one is written. ``-1`` (default)
            keeps all. The final export is not counted.
        export_timeout: Seconds the other ranks wait for rank 0 to write one export (or the
            rescue checkpoint) before they fail (default 7200). Raise it when a write to a
            slow filesystem may take longer; ``dist_timeout`` does not bound it.
        interval: Deprecated name of ``save_interval``.
        dtype: Deprecated name of ``precision``.
    """

    def __init__(
        self,
        save_folder: str = "./{run_name}/pruned_hf",
        save_interval: str | int | Time | None = None,
        precision: str | None = None,
        overwrite: bool = True,
        save_num_checkpoints_to_keep: int = -1,
        export_timeout: float = DEFAULT_EXPORT_TIMEOUT,
        interval: str | int | None = None,
        dtype: str | None = None,
    ):
        save_interval = _renamed("interval", interval, "save_interval", save_interval)
        precision = _renamed("dtype", dtype, "precision", precision)
        if precision is not None and precision not in DTYPES:
            raise ValueError(
                f"pruned_hf_export.precision must be one of {list(DTYPES)}, got {precision!r}"
            )
        if isinstance(save_interval, int):
            save_interval = f"{save_interval}ba"
        self.save_interval = Time.from_input(save_interval) if save_interval else None
        if self.save_interval is not None and self.save_interval.unit != TimeUnit.BATCH:
            raise ValueError(
                "pruned_hf_export.save_interval must be in batches, e.g. '500ba' "
                f"(got {save_interval!r})."
            )
        if not isinstance(save_num_checkpoints_to_keep, int) or save_num_checkpoints_to_keep < -1:
            raise ValueError(
                "pruned_hf_export.save_num_checkpoints_to_keep must be -1 (keep all) or a "
                f"count >= 0, got {save_num_checkpoints_to_keep!r}"
            )
        if isinstance(export_timeout, bool) or not (
            isinstance(export_timeout, (int, float)) and export_timeout > 0
        ):
            raise ValueError(
                f"pruned_hf_export.export_timeout must be a number of seconds > 0, got "
                f"{export_timeout!r}"
            )
        self.export_timeout = float(export_timeout)
        self.wait_group: Any = None  # the long-timeout group (set at INIT when distributed)
        self.save_folder = save_folder
        self.precision = precision
        self.dtype = DTYPES[precision] if precision else None
        self.overwrite = overwrite
        self.save_num_checkpoints_to_keep = save_num_checkpoints_to_keep
        self.exported: list[str | Path] = []
        self.periodic: list[str] = []  # this run's periodic exports, oldest first
        bound_open_files()

    def _folder(self, state: State, suffix: str = "") -> str:
        # A string, not a Path: an object-store URI must keep its "s3://".
        return self.save_folder.format(run_name=state.run_name) + suffix

    def init(self, state: State, logger: Logger) -> None:
        """Checks the export folder(s) before anything trains (rank 0 checks, every rank stops).

        Also creates, on every rank, the process group the other ranks wait on while rank 0
        writes (a collective: every rank reaches ``INIT`` together).
        """
        self.wait_group = long_timeout_group(self.export_timeout)
        problem = None
        if dist.get_global_rank() == 0:
            try:
                if is_remote(self.save_folder):
                    # Proves the store reachable and the folder ours (or empty) before training.
                    check_remote_output(self._folder(state), f"{KEY}.save_folder", self.overwrite)
                else:
                    for line in recover_interrupted(self._folder(state)):
                        log.warning("pruned_hf_export: %s", line)
                    check_output_dir(self._folder(state), f"{KEY}.save_folder", self.overwrite)
                if self.save_interval is not None and not is_remote(self.save_folder):
                    # Periodic exports go to siblings: <save_folder>_ba<N>.
                    check_output_dir(
                        self._folder(state, "_ba0"), f"{KEY}.save_folder (save_interval)", True
                    )
            except OutputPathError as e:
                problem = str(e)
        problem = self._from_rank0(problem)
        if problem is not None:
            raise OutputPathError(problem)

    def _from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank, waiting as long as ``export_timeout`` allows."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.wait_group)
        return box[0]

    def fit_start(self, state: State, logger: Logger) -> None:
        """Fails fast when there are no gates to export."""
        if find_gated_hf_model(state.model) is None:
            raise RuntimeError(
                "pruned_hf_export needs the targeted_pruning (or oneshot_pruning) algorithm in "
                "the same run."
            )

    def batch_end(self, state: State, logger: Logger) -> None:
        """Periodic export; a failure is logged and training goes on (the gates are intact)."""
        if self.save_interval is None:
            return
        batch = int(state.timestamp.batch)
        if batch % int(self.save_interval.value) == 0:
            folder = self._folder(state, f"_ba{batch}")
            # Rank 0 also drops the old exports before the others are told: deleting a
            # large folder must not hold them in the next training step's collective.
            error = self._export(state, logger, folder, self._drop_old_periodic_exports)
            if error is not None:
                log.error("pruned_hf_export: the export to %s failed: %s", folder, error)

    def _drop_old_periodic_exports(self, folder: str) -> None:
        """Records ``folder`` and deletes the oldest periodic exports beyond the number to keep."""
        self.periodic.append(folder)
        keep = self.save_num_checkpoints_to_keep
        if keep < 0:
            return
        while len(self.periodic) > keep:
            old = self.periodic.pop(0)
            if is_remote(old):
                try:
                    names = list_remote(old, f"{KEY}.save_num_checkpoints_to_keep")
                    if EXPORT_RECORD in names:
                        delete_remote(old, names, f"{KEY}.save_num_checkpoints_to_keep")
                except OutputPathError as error:
                    log.warning("pruned_hf_export: could not remove %s: %s", old, error)
                continue
            # Only a folder that still holds our export record: never someone else's files.
            if is_ours(old):
                shutil.rmtree(old, ignore_errors=True)
                log.info("pruned_hf_export: removed %s (save_num_checkpoints_to_keep)", old)

    def fit_end(self, state: State, logger: Logger) -> None:
        """Final export; if it fails, the trained state is saved as a checkpoint first."""
        folder = self._folder(state)
        error = self._export(state, logger, folder)
        if error is None:
            return
        rescue, rescue_error = self._save_rescue_checkpoint(state, folder)
        if rescue is not None:
            raise RuntimeError(
                f"pruned_hf_export: writing {folder} failed ({error}). The trained model is "
                f"not lost: it was saved as the checkpoint {rescue}. Fix the problem, then "
                f"run `composer-shear export {rescue} {folder}`."
            )
        raise RuntimeError(
            f"pruned_hf_export: writing {folder} failed ({error}), and so did saving the "
            f"trained state as a checkpoint ({rescue_error}); keep this run's regular "
            "checkpoints (save_folder) and export one with `composer-shear export`."
        )

    def _export(
        self,
        state: State,
        logger: Logger,
        folder: str,
        then: Callable[[str], None] | None = None,
    ) -> str | None:
        """Exports on rank 0; returns rank 0's error message (on every rank), or ``None``.

        ``then(folder)`` runs on rank 0 after a successful write, before the others are told.
        """
        error: str | None = None
        # Every rank takes part in the gather (a quick collective of the default group); only
        # rank 0 receives the tensors.
        weights = full_state_dict(state.model) if is_sharded(state.model) else None
        if dist.get_global_rank() == 0:
            try:
                self._export_rank0(state, logger, folder, weights)
                if then is not None:
                    then(folder)
            except Exception as exc:  # reported below, after the other ranks know
                log.exception("pruned_hf_export: export to %s failed", folder)
                error = f"{type(exc).__name__}: {exc}"
        del weights
        # Every rank learns whether rank 0 succeeded, so none waits forever on a failed export;
        # they wait on the long-timeout group, so a slow write trips no dist_timeout.
        return self._from_rank0(error)

    def _save_rescue_checkpoint(self, state: State, folder: str) -> tuple[Path | None, str | None]:
        """Writes a Composer checkpoint of the trained state where it can (all ranks call).

        Candidates: next to a local export folder, then the system temp folder. Returns the
        checkpoint path (``None`` if none could be written) and the last error.
        """
        name = f"{Path(parse_uri(folder)[2]).name}-rescue-{state.run_name}"
        places = [] if is_remote(folder) else [Path(folder).parent / name]
        places.append(Path(tempfile.gettempdir()) / name)
        choice: list[str | None] = [None]
        errors: list[str] = []
        if dist.get_global_rank() == 0:
            for place in places:
                try:
                    check_output_dir(place, "rescue checkpoint", overwrite=True)
                except OutputPathError as e:
                    errors.append(str(e))
                    continue
                choice[0] = str(place)
                break
        choice = self._from_rank0(choice[0])
        if choice is None:
            return None, errors[-1] if errors else "no writable location"
        filename = str(Path(choice) / "ep{epoch}-ba{batch}-rank{rank}.pt")
        saved, error = None, None
        try:
            saved = write_checkpoint(state, filename, self.wait_group)
        except Exception as e:  # reported with the export error
            log.exception("pruned_hf_export: saving the rescue checkpoint failed")
            error = f"{type(e).__name__}: {e}"
        saved, error = self._from_rank0((None if saved is None else str(saved), error))
        if error is not None:
            return None, error
        return (Path(saved) if saved else Path(choice)), None

    def _export_rank0(
        self, state: State, logger: Logger, folder: str, weights: dict | None
    ) -> None:
        hf_model = find_gated_hf_model(state.model)
        if weights is not None:
            # Sharded: rebuild an unsharded CPU copy from the gathered state dict.
            if not all(key.startswith(MODEL_PREFIX) for key in weights):
                raise RuntimeError("unexpected state dict layout (keys without 'model.')")
            gates = find_gates(hf_model)
            weights = {key[len(MODEL_PREFIX) :]: value for key, value in weights.items()}
            hf_model = gated_model_from_weights(
                hf_model.config,
                weights,
                gates.built_for.config_updates(),
                binary=gates.binary,
                resolved_target=gates.target.config_updates(),
            )
        tokenizer = getattr(_composer_model(state.model), "tokenizer", None)
        # How the units were chosen (learned, or a one-shot job's scores), for the record.
        info = {
            key: value
            for algorithm in state.algorithms
            if isinstance(algorithm, TargetedPruning)
            for key, value in algorithm.export_info().items()
        }
        summary = export_model(
            hf_model, folder, tokenizer, overwrite=self.overwrite, dtype=self.dtype, info=info
        )
        self.exported.append(summary.out_dir)
        log.info("pruned_hf_export:\n%s", summary.describe())
        logger.log_metrics({"pruned_hf_export/num_params": float(summary.target.num_params())})


def long_timeout_group(seconds: float) -> Any:
    """A gloo process group over every rank whose collectives wait up to ``seconds``.

    Every rank must call it (creating a group is collective). ``None`` (Composer's helpers
    then use the default group, if any) when the job is not distributed. Gloo runs on the CPU
    beside any default backend (NCCL on GPU clusters): only small status objects cross it.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    if torch.distributed.get_world_size() == 1:
        return None
    return torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(seconds=seconds))


def write_checkpoint(state: State, filename: str, group: Any) -> str | None:
    """Composer's ``save_checkpoint``, with the waits on ``group`` instead of the default group.

    Composer's ends in a barrier of the default group while rank 0 writes a monolithic
    checkpoint, bounded by ``dist_timeout``: the weights and optimizer state of a 7B model
    (~110 GB) take longer than that to write. Here the gathering of the state (quick) stays
    on the default group; the write of a monolithic checkpoint happens on rank 0 and a
    sharded one (``state_dict_type: sharded``) is written by every rank with
    ``torch.distributed.checkpoint`` coordinated over ``group``. Returns the checkpoint file
    on rank 0 (monolithic) or the sharded checkpoint's folder on every rank, else ``None``;
    the layout is Composer's, so ``composer-shear export`` and Composer's ``load_path`` read
    it.
    """
    state_dict = {"state": state.state_dict(), "rng": reproducibility.get_rng_state()}
    path = get_save_filename(state, filename)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if state.fsdp_sharded_state_dict_enabled:
        if dist.get_global_rank() > 0:
            state_dict.pop("rng")  # as Composer does: rank 0 keeps every rank's RNG state
        dist_cp.save(
            state_dict=state_dict,
            storage_writer=dist_cp.FileSystemWriter(str(Path(path).parent)),
            planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True),
            process_group=group,
        )
        return str(Path(path).parent)  # the folder is the checkpoint
    if dist.get_global_rank() == 0:
        with open(path, "wb") as f:
            torch.save(state_dict, f)
        return path
    return None


def _renamed(old_name: str, old_value: Any, new_name: str, new_value: Any) -> Any:
    """The value of a renamed key: the new name's, else the old name's (with a warning)."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise ValueError(
            f"pruned_hf_export: give {new_name} only ({old_name} is its deprecated name)."
        )
    warnings.warn(
        f"pruned_hf_export: `{old_name}` is deprecated; use `{new_name}` "
        "(the key name of LLM Foundry's hf_checkpointer).",
        DeprecationWarning,
        stacklevel=3,
    )
    return old_value


def _composer_model(model):
    # Unwrap DDP (`.module`) to reach Composer's HuggingFaceModel, which holds the tokenizer.
    while hasattr(model, "module") and not hasattr(model, "tokenizer"):
        model = model.module
    return model
