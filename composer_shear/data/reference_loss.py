"""Reference losses for dynamic batch loading: measure them, or predict them from a scaling law.

Dynamic batch loading needs, per domain, the loss a model of the *target* size should reach.
The paper fits ``L(N) = a / N**b + c`` per domain on the losses of several larger models of the
same family and evaluates it at the target parameter count; when no such family is available,
its authors suggest the source model's own loss. Both routes end in the YAML snippet for
:class:`~composer_shear.callbacks.dynamic_batch_loading.DynamicBatchLoading`.

CLI (through ``composer-shear``)::

    composer-shear reference-loss --model HF_DIR --data DATA_DIR [--domains cc github]
    composer-shear reference-loss --fit losses.yaml --target-params 2.7e9 [--out snippet.yaml]
    composer-shear reference-loss ... --recipe yamls/llama2-7b/prune_2.7b.yaml

where ``losses.yaml`` holds ``sizes: [N1, N2, ...]`` and ``losses: {domain: [L1, L2, ...]}``.
The snippet's ``target_loss`` is a mapping by domain name, in the order of ``--domains``, else
of the ``--recipe``'s train domains, else of ``losses.yaml`` (``--fit``) or the domain folders
sorted by name; the callback matches it to the train domains by name, so the order is for
reading only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from composer_shear.data.calibration import read_mds_token_samples
from composer_shear.data.identity import check_split_tokenizer, read_split_meta
from composer_shear.interface import (
    DTYPE_NAMES,
    UsageError,
    device_name,
    model_path,
    positive_int,
    progress,
)
from composer_shear.output_paths import (
    OutputPathError,
    check_output_file,
    is_remote,
    object_store_of,
    write_text_output,
)

__all__ = [
    "evaluate_domain_losses",
    "fit_scaling_law",
    "predict_loss",
    "recipe_domains",
    "register_cli",
    "target_loss_snippet",
]


# --------------------------------------------------------------------------- reading eval data


# --------------------------------------------------------------------------- measuring losses


def _eval_split_dir(data_dir: Path, domain: str) -> Path:
    for candidate in (data_dir / domain / "eval", data_dir / domain / "val"):
        if (candidate / "index.json").exists():
            return candidate
    raise FileNotFoundError(f"No eval split for domain {domain!r} under {data_dir / domain}.")


def _check_domains(requested: Sequence[str], available: Sequence[str], where: str) -> None:
    """Refuses requested domains that ``where`` does not have, naming them and the rest."""
    missing = [d for d in requested if d not in available]
    if missing:
        raise ValueError(
            f"no domain(s) {missing} in {where}; it has {list(available)}. Pass --domains "
            "with names from that list (or fix the recipe's domains)."
        )


def recipe_domains(recipe: str | Path) -> list[str]:
    """The train domains of a training YAML (``train_loader.dataset.domains``), in its order."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(recipe)
    domains = OmegaConf.select(cfg, "train_loader.dataset.domains", default=None)
    if domains is None:
        raise ValueError(f"{recipe} has no train_loader.dataset.domains (a multi_domain loader).")
    return [str(d) for d in domains]


def _discover_domains(data_dir: Path) -> list[str]:
    domains = sorted(
        p.name
        for p in data_dir.iterdir()
        if p.is_dir() and any((p / s / "index.json").exists() for s in ("eval", "val"))
    )
    if not domains:
        raise FileNotFoundError(f"No <domain>/eval MDS splits under {data_dir}.")
    return domains


def evaluate_domain_losses(
    model_dir: str | Path,
    data_dir: str | Path,
    domains: Sequence[str] | None = None,
    max_seq_len: int = 2048,
    batch_size: int = 4,
    max_samples: int | None = None,
    device: str = "cpu",
    model: Any | None = None,
    dtype: str = "float32",
) -> dict[str, float]:
    """Mean per-token cross-entropy of a Hugging Face causal LM on each domain's eval split.

    Each sample is truncated to ``max_seq_len`` tokens and predicts its own next tokens (as in
    training: labels are the inputs shifted by one, padding ignored). The mean is over all
    predicted tokens of the domain, like Composer's ``LanguageCrossEntropy``.

    Args:
        model_dir: Hugging Face model directory (config, weights, tokenizer).
        data_dir: directory holding ``<domain>/eval`` MDS splits.
        domains: domains to evaluate, in this order; default: every domain with an eval split,
            sorted by name.
        max_seq_len: truncation length.
        batch_size: sequences per forward pass.
        max_samples: evaluate at most this many samples per domain.
        device: torch device.
        model: an already loaded model to use instead of loading ``model_dir``.
        dtype: dtype ``model_dir``'s weights are loaded in (``float32``, ``bfloat16``,
            ``float16``); the cross-entropy is computed in float32 from the logits either way.

    Returns:
        ``{domain: loss}`` in the order of ``domains``.
    """
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data_dir = Path(data_dir)
    available = _discover_domains(data_dir)
    if domains is not None:
        _check_domains(domains, available, f"{data_dir} (<domain>/eval splits)")
    domains = list(domains) if domains is not None else available
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}, got {dtype!r}")
    if model is None:
        model_dir = model_path(model_dir)  # a missing directory: a clear error, before loading
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        tokenizer = None  # Token-id shards do not need one.
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    pad_id = 0
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        pad_id = tokenizer.pad_token_id

    for domain in domains:  # every domain before the first forward pass
        split_dir = _eval_split_dir(data_dir, domain)
        check_split_tokenizer(read_split_meta(split_dir), tokenizer, f"eval split {split_dir}")
    results: dict[str, float] = {}
    for domain in domains:
        split_dir = _eval_split_dir(data_dir, domain)
        total_loss, total_tokens = 0.0, 0
        batch: list[np.ndarray] = []

        def flush(batch: list[np.ndarray]) -> tuple[float, int]:
            length = max(len(x) for x in batch)
            ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), length), dtype=torch.long)
            for row, tokens in enumerate(batch):
                ids[row, : len(tokens)] = torch.from_numpy(tokens)
                mask[row, : len(tokens)] = 1
            ids, mask = ids.to(device), mask.to(device)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            return float(loss), int((labels != -100).sum())

        samples = read_mds_token_samples(split_dir, tokenizer, max_samples)
        for tokens in progress(samples, desc=f"eval {domain}", unit="sample", total=max_samples):
            tokens = tokens[:max_seq_len]
            if len(tokens) < 2:
                continue  # Nothing to predict.
            batch.append(tokens)
            if len(batch) == batch_size:
                loss, n = flush(batch)
                total_loss, total_tokens = total_loss + loss, total_tokens + n
                batch = []
        if batch:
            loss, n = flush(batch)
            total_loss, total_tokens = total_loss + loss, total_tokens + n
        if total_tokens == 0:
            raise ValueError(f"Domain {domain!r} has no eval tokens in {split_dir}.")
        results[domain] = total_loss / total_tokens
    return results


# --------------------------------------------------------------------------- scaling law


def _fit_ac(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares ``y ~ a * x + c`` with ``a, c >= 0``; returns (a, c, sum of squares)."""
    design = np.stack([x, np.ones_like(x)], axis=1)
    candidates = []
    (a, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    if a >= 0 and c >= 0:
        candidates.append((a, c))
    # Boundary solutions of the two-variable non-negative least squares problem.
    candidates.append((max(float(x @ y) / float(x @ x), 0.0), 0.0))
    candidates.append((0.0, max(float(y.mean()), 0.0)))
    best = None
    for a, c in candidates:
        sse = float(np.sum((a * x + c - y) ** 2))
        if best is None or sse < best[2]:
            best = (float(a), float(c), sse)
    assert best is not None
    return best


def fit_scaling_law(
    sizes: Sequence[float], losses: Sequence[float], b_range: tuple[float, float] = (1e-3, 3.0)
) -> tuple[float, float, float]:
    """Fits ``L(N) = a / N**b + c`` (``a, c >= 0``, ``b`` in ``b_range``) by least squares.

    For a fixed exponent ``b`` the model is linear in ``(a, c)``, so the fit profiles over ``b``:
    a log-spaced grid first, then a golden-section refinement around the best grid point. Sizes
    are scaled by their largest value internally, which keeps the problem well conditioned for
    parameter counts in the billions.

    Args:
        sizes: model sizes ``N`` (e.g. parameter counts), at least three distinct positive values.
        losses: the loss of each size.
        b_range: search interval of the exponent.

    Returns:
        ``(a, b, c)`` for sizes in the units given.
    """
    n = np.asarray(sizes, dtype=np.float64).reshape(-1)
    y = np.asarray(losses, dtype=np.float64).reshape(-1)
    if n.shape != y.shape:
        raise ValueError(f"sizes ({n.size}) and losses ({y.size}) differ in length.")
    if len(np.unique(n)) < 3:
        raise ValueError(
            f"Fitting a / N**b + c needs at least 3 distinct model sizes, got {n.tolist()}."
        )
    if not (np.all(np.isfinite(n)) and np.all(n > 0) and np.all(np.isfinite(y))):
        raise ValueError(f"sizes must be positive and finite, losses finite: {n}, {y}.")
    scale = float(n.max())
    u = n / scale

    def sse(b: float) -> float:
        return _fit_ac(u ** (-b), y)[2]

    lo, hi = b_range
    grid = np.geomspace(lo, hi, 400)
    errors = np.array([sse(b) for b in grid])
    i = int(np.argmin(errors))
    left, right = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    # Golden-section search on the (locally unimodal) profile.
    ratio = (math.sqrt(5) - 1) / 2
    x1, x2 = right - ratio * (right - left), left + ratio * (right - left)
    f1, f2 = sse(x1), sse(x2)
    for _ in range(100):
        if f1 < f2:
            right, x2, f2 = x2, x1, f1
            x1 = right - ratio * (right - left)
            f1 = sse(x1)
        else:
            left, x1, f1 = x1, x2, f2
            x2 = left + ratio * (right - left)
            f2 = sse(x2)
    b = min((grid[i], errors[i]), (x1, f1), (x2, f2), key=lambda t: t[1])[0]
    a_scaled, c, _ = _fit_ac(u ** (-b), y)
    # a_scaled * (N / scale)**-b == (a_scaled * scale**b) * N**-b
    return float(a_scaled * scale**b), float(b), float(c)


def predict_loss(params: Sequence[float], n: float | np.ndarray) -> float | np.ndarray:
    """Evaluates ``a / n**b + c`` for ``params = (a, b, c)``."""
    a, b, c = params
    value = a * np.power(np.asarray(n, dtype=np.float64), -b) + c
    return float(value) if np.ndim(value) == 0 else value


# --------------------------------------------------------------------------- CLI


def target_loss_snippet(losses: dict[str, float], update_type: str = "doremi") -> str:
    """The ``callbacks:`` YAML block for these per-domain reference losses (in dict order).

    ``target_loss`` is a mapping by domain name: the callback matches it to the train
    dataset's domains by name and names any missing or extra one.
    """
    mapping = ", ".join(f"{domain}: {loss:.4f}" for domain, loss in losses.items())
    return (
        "# target_loss by domain name (every train domain, no other)\n"
        "callbacks:\n"
        "  dynamic_batch_loading:\n"
        f"    update_type: {update_type}\n"
        f"    target_loss: {{{mapping}}}\n"
    )


def _load_fit_file(path: Path) -> tuple[list[float], dict[str, list[float]]]:
    text = path.read_text()
    if path.suffix == ".json":
        spec = json.loads(text)
    else:
        import yaml

        spec = yaml.safe_load(text)
    if not isinstance(spec, dict) or "sizes" not in spec or "losses" not in spec:
        raise ValueError(
            f"{path} must hold `sizes: [N1, N2, ...]` and `losses: {{domain: [L1, L2, ...]}}`."
        )
    sizes = [float(s) for s in spec["sizes"]]
    losses = {str(d): [float(v) for v in vals] for d, vals in spec["losses"].items()}
    for domain, vals in losses.items():
        if len(vals) != len(sizes):
            raise ValueError(f"Domain {domain!r} has {len(vals)} losses for {len(sizes)} sizes.")
    return sizes, losses


def _run(args: argparse.Namespace) -> int:
    out = sys.stdout
    if args.fit is not None and args.model is not None:
        raise UsageError("--fit and --model are two ways to get the losses: give one")
    if args.fit is not None and args.target_params is None:
        raise UsageError("--fit needs --target-params")
    if args.model is not None and args.data is None:
        raise UsageError("--model needs --data")
    if args.fit is None and args.model is None:
        raise UsageError("give either --model and --data, or --fit and --target-params")
    if args.out:
        # Before any evaluation: an unwritable file or an unsupported scheme fails now.
        try:
            if is_remote(args.out):
                object_store_of(args.out, "reference-loss --out")
            else:
                check_output_file(args.out, "reference-loss --out")
        except OutputPathError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    try:
        if args.recipe is not None and not args.domains:
            args.domains = recipe_domains(args.recipe)
        if args.fit is not None:
            sizes, per_domain = _load_fit_file(Path(args.fit))
            if args.domains:
                _check_domains(args.domains, list(per_domain), f"{args.fit} (losses)")
                per_domain = {d: per_domain[d] for d in args.domains}
            fits = {domain: fit_scaling_law(sizes, values) for domain, values in per_domain.items()}
            result = {
                domain: predict_loss(params, args.target_params) for domain, params in fits.items()
            }
        else:
            result = evaluate_domain_losses(
                args.model,
                args.data,
                domains=args.domains,
                max_seq_len=args.max_seq_len,
                batch_size=args.batch_size,
                max_samples=args.max_samples,
                device=args.device,
                dtype=args.dtype,
            )
    except (OSError, ValueError, RuntimeError) as error:
        # OSError covers a missing file or model (interface.ModelPathError); ValueError a
        # fit file, a recipe or shards that do not hold what they should (a domain they do not
        # have is named with the ones they have).
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.fit is not None:
        print(f"{'domain':<20} {'a':>12} {'b':>8} {'c':>8} {'L(target)':>10}", file=out)
        for domain, (a, b, c) in fits.items():
            print(f"{domain:<20} {a:>12.4g} {b:>8.4f} {c:>8.4f} {result[domain]:>10.4f}", file=out)
    else:
        print(f"{'domain':<20} {'loss':>8}", file=out)
        for domain, value in result.items():
            print(f"{domain:<20} {value:>8.4f}", file=out)
    snippet = target_loss_snippet(result)
    print("\n" + snippet, end="", file=out)
    if args.out:
        # A local path or an object-store URI (s3://...).
        try:
            write_text_output(args.out, snippet, "reference-loss --out")
        except OutputPathError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the ``reference-loss`` subcommand to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "reference-loss",
        help="per-domain reference losses for dynamic batch loading",
        description=(
            "Measure per-domain eval losses of a model (--model, --data) or fit "
            "L(N) = a/N^b + c per domain and predict at --target-params (--fit); prints the "
            "`dynamic_batch_loading` YAML snippet."
        ),
    )
    parser.add_argument(
        "--model", help="Hugging Face model directory (or hub id) to evaluate; needs --data"
    )
    parser.add_argument("--data", help="directory with <domain>/eval MDS splits")
    parser.add_argument(
        "--domains",
        nargs="+",
        help="domains, in the train dataset's order (default: every domain of --data / --fit)",
    )
    parser.add_argument(
        "--recipe", help="training YAML: its train domains (and their order) unless --domains"
    )
    parser.add_argument(
        "--max-seq-len", type=positive_int, default=2048, help="tokens per eval sample (truncated)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=4, help="sequences per forward pass"
    )
    parser.add_argument(
        "--max-samples",
        type=positive_int,
        default=None,
        help="eval samples per domain (default: all)",
    )
    parser.add_argument(
        "--device",
        type=device_name,
        default="cpu",
        help="torch device of the evaluation (cpu, cuda, cuda:1)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="float32",
        help="dtype the model's weights are loaded in (bfloat16 halves a large model's memory; "
        "the loss is computed in float32 from the logits)",
    )
    parser.add_argument("--fit", help="YAML/JSON with `sizes: [...]` and `losses: {domain: [...]}`")
    parser.add_argument(
        "--target-params", type=float, help="target model size (parameters) for --fit"
    )
    parser.add_argument("--out", help="also write the YAML snippet to this file")
    parser.set_defaults(func=_run)
    return parser
