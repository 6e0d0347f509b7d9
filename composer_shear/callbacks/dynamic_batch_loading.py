"""Dynamic batch loading: re-weight the training mixture from per-domain eval losses.

Sheared-LLaMA (Xia et al., 2023, arXiv 2310.06694, Alg. 1) keeps a weight per data domain and,
every few steps, moves weight towards the domains whose loss is furthest above a reference loss
(what a model of the target size should reach):

    delta = max(L - L_ref, 0)
    w <- softmax(log w + eta * delta)          # i.e. w * exp(eta * delta), normalised
    w <- (1 - c) * w + c / k                   # keep every domain reachable

This module holds the update rule as a pure function (:func:`doremi_update`) and the Composer
callback that feeds it eval losses and writes the new weights into the train dataset.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from composer_shear.data.descriptors import bound_open_files
from composer_shear.data.mixer import find_multi_domain_dataset

log = logging.getLogger(__name__)

__all__ = ["DynamicBatchLoading", "doremi_update", "target_losses_in_order"]

UPDATE_TYPES = ("doremi", "constant")


def doremi_update(
    weights: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    target_loss: Sequence[float] | np.ndarray,
    smoothing: float = 1e-4,
    step_size: float = 1.0,
) -> np.ndarray:
    """One dynamic batch loading step (Sheared-LLaMA's rule).

    Args:
        weights: current domain weights (non-negative, summing to 1).
        losses: current per-domain eval loss ``L``.
        target_loss: per-domain reference loss ``L_ref``.
        smoothing: weight ``c`` of the uniform distribution mixed in after the update.
        step_size: multiplier ``eta`` of the excess loss (the paper uses 1).

    Returns:
        The new weights, float64, summing to 1.
    """
    w = np.asarray(weights, dtype=np.float64)
    excess = np.maximum(np.asarray(losses, np.float64) - np.asarray(target_loss, np.float64), 0.0)
    if not (w.shape == excess.shape and w.ndim == 1 and w.size > 0):
        raise ValueError(f"Shape mismatch: weights {w.shape}, losses/targets {excess.shape}.")
    # softmax(log w + eta * delta), computed in log space so tiny weights cannot underflow to a
    # NaN; a zero weight stays zero before smoothing (log 0 = -inf), as in the paper.
    with np.errstate(divide="ignore"):
        logits = np.log(w) + step_size * excess
    logits -= logits.max()
    new = np.exp(logits)
    new /= new.sum()
    new = (1.0 - smoothing) * new + smoothing / w.size
    return new / new.sum()


def target_losses_in_order(
    target_loss: Mapping[str, float] | Sequence[float], domains: Sequence[str]
) -> list[float]:
    """The reference losses in the order of ``domains``, checked against them by name.

    Args:
        target_loss: ``{domain: loss}`` (the form to write), or a list in the order of
            ``domains`` (older recipes: accepted with a warning that prints the mapping it
            was read as, since a list in another order steers the mixture toward the wrong
            domains without any error).
        domains: the train dataset's domains, in its order.

    Returns:
        One finite loss per domain, in the order of ``domains``.

    Raises:
        ValueError: a domain without a loss, a loss for a domain the dataset does not have,
            a list of another length, or a non-finite loss.
    """
    domains = [str(d) for d in domains]
    if isinstance(target_loss, Mapping):
        given = {str(k): float(v) for k, v in target_loss.items()}
        missing = [d for d in domains if d not in given]
        extra = [d for d in given if d not in domains]
        if missing or extra:
            raise ValueError(
                "dynamic_batch_loading.target_loss must name exactly the train dataset's "
                f"domains {domains}: "
                + "; ".join(
                    part
                    for part in (
                        f"no reference loss for {missing}" if missing else "",
                        f"reference loss for unknown domain(s) {extra}" if extra else "",
                    )
                    if part
                )
                + "."
            )
        values = [given[d] for d in domains]
    else:
        values = [float(v) for v in target_loss]
        if len(values) != len(domains):
            raise ValueError(
                f"target_loss has {len(values)} values but the train dataset has "
                f"{len(domains)} domains {domains}; write it as a mapping {{domain: loss}}."
            )
        mapping = ", ".join(f"{d}: {v}" for d, v in zip(domains, values, strict=True))
        log.warning(
            "dynamic_batch_loading.target_loss is a list, matched to the train dataset's "
            "domains by position: {%s}. Write this mapping in the YAML instead (a list in "
            "another order would steer the mixture toward the wrong domains).",
            mapping,
        )
    bad = {d: v for d, v in zip(domains, values, strict=True) if not math.isfinite(v)}
    if bad:
        raise ValueError(f"target_loss must be finite, got {bad}.")
    return values


class DynamicBatchLoading(Callback):
    """Updates the domain weights of the training mixture after every evaluation round.

    The train loader must be the ``multi_domain`` loader (its dataset exposes ``domains``,
    ``weights`` and ``set_weights``). Per-domain losses come from **one eval loader per domain**,
    each with ``label`` equal to the domain name: llm-foundry then names the evaluator
    ``eval/<domain>`` and Composer keeps its metrics in
    ``state.eval_metrics['eval/<domain>']['LanguageCrossEntropy']``. One loader per domain means
    every loss is a mean over real tokens of that domain, never over an empty batch (the NaN that
    per-domain losses on a mixed batch produce). The YAML to write:

    .. code-block:: yaml

        train_loader:
          name: multi_domain
          ...
        eval_interval: 50ba          # one weight update per evaluation round
        eval_loader:
          - label: cc                # label == domain name, one entry per domain
            name: multi_domain
            split: eval
            ...
          - label: github
            ...
        callbacks:
          dynamic_batch_loading:
            update_type: doremi      # or constant (weights stay fixed, losses still logged)
            target_loss: {cc: 1.87, github: 0.69}  # reference loss per domain, by name
            smoothing: 1.0e-4

    The update runs at :attr:`~composer.core.Event.EVAL_AFTER_ALL`, which the trainer fires once
    per evaluation round after *all* evaluators due at that point have run, so the rule sees every
    domain's loss from the same model. Losses are captured at each ``EVAL_END`` so that a round in
    which some domain was not evaluated (evaluators with different intervals) is detected and
    skipped rather than mixed with a stale value.

    Every rank ends an update with the same weights: the eval metrics are already synced by
    torchmetrics, and the whole update record is additionally broadcast from rank 0.

    The update history (step, losses, weights) is part of the callback's ``state_dict``, so a
    resumed run continues from the same weights; at ``FIT_START`` the dataset's (separately
    checkpointed) weights are checked against the last record and reset to it if they differ.

    Logged after every update (Composer logger, at the current batch):
    ``dynamic_batch_loading/weight/<domain>``, ``dynamic_batch_loading/eval_loss/<domain>`` and,
    with a target, ``dynamic_batch_loading/excess_loss/<domain>``.

    Args:
        update_type: ``'doremi'`` (Sheared-LLaMA's rule) or ``'constant'`` (keep the initial
            weights; useful as a baseline that logs the same metrics).
        target_loss: reference loss per domain, ``{domain: loss}`` naming exactly the train
            dataset's ``domains`` (a missing or extra domain is an error naming it). A list in
            the order of ``domains`` (older recipes) is accepted with a warning printing the
            mapping it was read as (:func:`target_losses_in_order`). Required for
            ``'doremi'``; optional for ``'constant'`` (excess loss is then not logged).
        smoothing: ``c``, the weight of the uniform distribution mixed into the new weights.
        step_size: ``eta``, multiplier of the excess loss (1 in the paper).
        eval_label_prefix: prefix of the evaluator labels; llm-foundry uses ``'eval/'``.
        metric_name: the eval metric used as the domain loss.
    """

    def __init__(
        self,
        update_type: str = "doremi",
        target_loss: Mapping[str, float] | Sequence[float] | None = None,
        smoothing: float = 1e-4,
        step_size: float = 1.0,
        eval_label_prefix: str = "eval/",
        metric_name: str = "LanguageCrossEntropy",
    ) -> None:
        if update_type not in UPDATE_TYPES:
            raise ValueError(f"update_type must be one of {UPDATE_TYPES}, got {update_type!r}.")
        if update_type == "doremi" and target_loss is None:
            raise ValueError("update_type='doremi' needs target_loss (one value per domain).")
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing must be in [0, 1], got {smoothing}.")
        if not step_size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}.")
        self.update_type = update_type
        # OmegaConf DictConfig / ListConfig become plain dicts / lists of floats.
        self.target_loss_spec: dict[str, float] | list[float] | None = None
        if isinstance(target_loss, Mapping):
            self.target_loss_spec = {str(k): float(v) for k, v in target_loss.items()}
            values = list(self.target_loss_spec.values())
        elif target_loss is not None:
            self.target_loss_spec = values = [float(x) for x in target_loss]
        if target_loss is not None and not all(math.isfinite(x) for x in values):
            raise ValueError(f"target_loss must be finite, got {self.target_loss_spec}.")
        # In the train dataset's domain order, once FIT_START has matched it to the domains.
        self.target_loss: list[float] | None = None
        self.smoothing = float(smoothing)
        self.step_size = float(step_size)
        self.eval_label_prefix = eval_label_prefix
        self.metric_name = metric_name

        self.history: list[dict[str, Any]] = []
        self.domains: list[str] | None = None
        self._dataset: Any = None
        self._round_losses: dict[str, float] = {}
        # Updates at which this rank's own result differed from rank 0's (should stay 0).
        self.rank_disagreements = 0
        bound_open_files()  # before LLM Foundry builds the job's Streaming datasets

    # ------------------------------------------------------------------ helpers

    def _label(self, domain: str) -> str:
        return f"{self.eval_label_prefix}{domain}"

    @property
    def weights(self) -> np.ndarray | None:
        """The weights after the last update (``None`` before the first one)."""
        return None if not self.history else np.asarray(self.history[-1]["weights"])

    def _validate(self, state: State) -> None:
        dataset = find_multi_domain_dataset(state.train_dataloader)
        if dataset is None:
            raise ValueError(
                "DynamicBatchLoading needs a multi-domain train dataset (`train_loader: name: "
                f"multi_domain`); found {type(getattr(state.train_dataloader, 'dataset', None))}."
            )
        domains = [str(d) for d in dataset.domains]
        if self.target_loss_spec is not None:
            self.target_loss = target_losses_in_order(self.target_loss_spec, domains)
        if self.domains is not None and self.domains != domains:
            # self.domains was restored from a checkpoint.
            raise ValueError(
                f"Checkpointed dynamic batch loading domains {self.domains} differ from the train "
                f"dataset's {domains}."
            )
        labels = {evaluator.label for evaluator in state.evaluators}
        missing = [self._label(d) for d in domains if self._label(d) not in labels]
        if missing:
            raise ValueError(
                f"DynamicBatchLoading needs one eval loader per domain; no evaluator labelled "
                f"{missing} (found {sorted(labels)}). Add to `eval_loader:` a list entry with "
                f"`label: <domain>` for each of {domains}."
            )
        for domain in domains:
            metrics = state.eval_metrics.get(self._label(domain), {})
            if metrics and self.metric_name not in metrics:
                raise ValueError(
                    f"Evaluator {self._label(domain)!r} has no metric {self.metric_name!r} "
                    f"(has {sorted(metrics)})."
                )
        self._dataset = dataset
        self.domains = domains

    def _reconcile_with_dataset(self) -> None:
        """After a resume, make the dataset's weights equal the last recorded update."""
        if not self.history:
            return
        expected = np.asarray(self.history[-1]["weights"], dtype=np.float64)
        current = np.asarray(self._dataset.weights, dtype=np.float64)
        if current.shape != expected.shape or not np.allclose(current, expected, atol=1e-12):
            log.warning(
                "Train dataset weights %s differ from the last dynamic batch loading update %s; "
                "using the latter.",
                current.tolist(),
                expected.tolist(),
            )
            self._dataset.set_weights(expected)

    # ------------------------------------------------------------------ events

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        """Dispatches the events this callback uses (see the class docstring)."""
        if event == Event.FIT_START:
            self._validate(state)
            self._reconcile_with_dataset()
        elif event == Event.EVAL_BEFORE_ALL:
            self._round_losses = {}
        elif event == Event.EVAL_END:
            self._capture(state)
        elif event == Event.EVAL_AFTER_ALL:
            self._update(state, logger)

    def _capture(self, state: State) -> None:
        if self.domains is None:
            return
        label = state.dataloader_label
        if label is None or not label.startswith(self.eval_label_prefix):
            return
        domain = label[len(self.eval_label_prefix) :]
        if domain not in self.domains:
            return
        metric = state.eval_metrics[label][self.metric_name]
        # Composer already computed (and cross-rank synced) it; compute() returns the cache.
        self._round_losses[domain] = float(metric.compute())

    def _update(self, state: State, logger: Logger) -> None:
        if self.domains is None or self._dataset is None:
            return  # Standalone eval outside fit().
        missing = [d for d in self.domains if d not in self._round_losses]
        if len(missing) == len(self.domains):
            return
        if missing:
            log.warning(
                "Evaluation round at %s did not evaluate domains %s; skipping the dynamic batch "
                "loading update (give every domain eval loader the same eval_interval).",
                state.timestamp.batch,
                missing,
            )
            return
        losses = np.array([self._round_losses[d] for d in self.domains], dtype=np.float64)
        bad = [d for d, x in zip(self.domains, losses, strict=True) if not math.isfinite(x)]
        if bad:
            raise RuntimeError(
                f"Non-finite eval loss for domains {bad} at {state.timestamp.batch}: "
                f"{dict(zip(self.domains, losses.tolist(), strict=True))}. Every domain's eval "
                "loader must yield tokens of that domain (check its eval split is not empty)."
            )
        before = np.asarray(self._dataset.weights, dtype=np.float64)
        excess = None
        if self.target_loss is not None:
            excess = np.maximum(losses - np.asarray(self.target_loss), 0.0)
        if self.update_type == "doremi":
            after = doremi_update(before, losses, self.target_loss, self.smoothing, self.step_size)
        else:
            after = before.copy()
        record = {
            "step": int(state.timestamp.batch),
            "eval_loss": losses.tolist(),
            "excess_loss": None if excess is None else excess.tolist(),
            "weights_before": before.tolist(),
            "weights": after.tolist(),
        }
        # Rank 0 decides, so that every rank holds bit-identical weights even if some
        # floating-point detail differed between ranks: each rank draws its own domains from
        # them, and a resumed rank replays its draws from this weight history.
        container = [record]
        dist.broadcast_object_list(container, src=0)
        local, record = record, container[0]
        if not np.allclose(local["weights"], record["weights"], rtol=1e-9, atol=1e-12):
            # Would mean the eval metrics were not synced; rank 0's weights win regardless.
            self.rank_disagreements += 1
            log.warning(
                "Rank %d computed weights %s, rank 0 %s; using rank 0's.",
                dist.get_global_rank(),
                local["weights"],
                record["weights"],
            )
        if self.update_type != "constant":
            self._dataset.set_weights(np.asarray(record["weights"], dtype=np.float64))
        self.history.append(record)
        self._log(record, logger)

    def _log(self, record: dict[str, Any], logger: Logger) -> None:
        metrics: dict[str, float] = {}
        for i, domain in enumerate(self.domains or []):
            metrics[f"dynamic_batch_loading/weight/{domain}"] = record["weights"][i]
            metrics[f"dynamic_batch_loading/eval_loss/{domain}"] = record["eval_loss"][i]
            if record["excess_loss"] is not None:
                metrics[f"dynamic_batch_loading/excess_loss/{domain}"] = record["excess_loss"][i]
        logger.log_metrics(metrics)

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The update history and the domain order (plain Python types)."""
        return {
            "history": copy.deepcopy(self.history),
            "domains": None if self.domains is None else list(self.domains),
            "update_type": self.update_type,
            "target_loss": (
                None
                if self.target_loss is None or self.domains is None
                else dict(zip(self.domains, self.target_loss, strict=True))
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the update history; the dataset is reconciled with it at ``FIT_START``."""
        self.history = copy.deepcopy(list(state.get("history", [])))
        domains = state.get("domains")
        self.domains = None if domains is None else list(domains)
        if state.get("update_type", self.update_type) != self.update_type:
            log.warning(
                "Resuming with update_type=%r; the checkpoint used %r.",
                self.update_type,
                state.get("update_type"),
            )
