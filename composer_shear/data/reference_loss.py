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
    composer -n 8 $(which composer-shear) reference-loss --model HF_DIR --data DATA --device cuda

where ``losses.yaml`` holds ``sizes: [N1, N2, ...]`` and ``losses: {domain: [L1, L2, ...]}``.
The snippet's ``target_loss`` is a mapping by domain name, in the order of ``--domains``, else
of the ``--recipe``'s train domains, else of ``losses.yaml`` (``--fit``) or the domain folders
sorted by name; the callback matches it to the train domains by name, so the order is for
reading only. Under a launcher (``composer -n N`` as above, or ``torchrun``) the ``--model``
evaluation is split over the ranks (:func:`evaluate_domain_losses`); global rank 0 prints and
writes ``--out`` / ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.utils import dist

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

# Bytes of one rank's error message passed to the other ranks (the rest is cut).
_MESSAGE_BYTES = 2000


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


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the default process group (``(0, 1)`` without)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _summed(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduces ``tensor`` (sum) in place; returns once gloo no longer holds it.

    torch 2.7's gloo worker threads let go of a collective's tensor only after the caller has
    resumed. Were theirs the last reference, freeing the tensor would need the GIL, and
    ``destroy_process_group`` (which joins those threads while holding the GIL) would wait for
    ever: waiting here until ours is the only reference lets the caller free it
    (pytorch/pytorch#154976 makes the destructor release the GIL instead).
    """
    held = tensor._use_count()
    torch.distributed.all_reduce(tensor)
    if torch.distributed.get_backend() == "gloo":
        deadline = time.monotonic() + 10.0  # a bound, should it ever keep the tensor
        while tensor._use_count() > held and time.monotonic() < deadline:
            time.sleep(0.001)
    return tensor


def _agree(stage: str, error: Exception | None, values: Sequence[float]) -> list[float]:
    """Sums ``values`` over the ranks in float64, and fails on every rank if any rank failed.

    The one collective of each stage (loading, each domain): every rank calls it exactly once
    per stage, having caught its own error instead of leaving, so a rank that failed never
    leaves the others waiting in a collective it will not join. In one process it returns
    ``values`` (or raises ``error`` as it is).

    Args:
        stage: What the ranks were doing, for the message.
        error: This rank's error in the stage, or ``None``.
        values: This rank's partial sums.

    Returns:
        The sums over all ranks.

    Raises:
        Exception: ``error`` itself where every rank failed with the same message (a missing
            domain: reported as one process would); else a ``RuntimeError`` naming each failed
            rank and its message, on every rank.
    """
    rank, world = _rank_and_world()
    if world == 1:
        if error is not None:
            raise error
        return list(values)
    # NCCL reduces CUDA tensors only; gloo CPU ones.
    on = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    flags = [0.0] * world
    flags[rank] = float(error is not None)
    sums = _summed(torch.tensor([*values, *flags], dtype=torch.float64, device=on)).tolist()
    failed = [r for r in range(world) if sums[len(values) + r]]
    if failed:
        # Every rank's message, each in its own row of a byte table summed over the ranks.
        table = torch.zeros((world, _MESSAGE_BYTES), dtype=torch.uint8)
        if error is not None:
            text = f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES]
            table[rank, : len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        rows = _summed(table.to(on)).cpu().numpy()
        messages = [bytes(rows[r]).rstrip(b"\0").decode(errors="replace") for r in failed]
        if error is not None and len(failed) == world and len(set(messages)) == 1:
            raise error
        detail = "; ".join(f"rank {r}: {m}" for r, m in zip(failed, messages, strict=True))
        raise RuntimeError(
            f"{stage} failed on {len(failed)} of {world} ranks ({detail})"
        ) from error
    return sums[: len(values)]


def _domain_sums(
    forward: Callable[[list[np.ndarray]], tuple[float, int]],
    samples: Iterable[np.ndarray],
    max_seq_len: int,
    batch_size: int,
    rank: int,
    world: int,
) -> tuple[float, float]:
    """This rank's loss sum and predicted-token count over one domain's samples.

    Every rank reads every sample and forms the same batches (so the batches, and with them
    the per-batch losses, are the ones a single process forms); batch ``i`` is forwarded by
    rank ``i % world`` only. Where the batches do not divide by the ranks the last ones get
    one batch fewer: the forwards of a full model copy need no communication, so unequal
    counts cannot deadlock.
    """
    total_loss, total_tokens = 0.0, 0
    batch: list[np.ndarray] = []
    index = 0
    for tokens in samples:
        tokens = tokens[:max_seq_len]
        if len(tokens) < 2:
            continue  # Nothing to predict.
        batch.append(tokens)
        if len(batch) == batch_size:
            if index % world == rank:
                loss, n = forward(batch)
                total_loss, total_tokens = total_loss + loss, total_tokens + n
            index, batch = index + 1, []
    if batch and index % world == rank:
        loss, n = forward(batch)
        total_loss, total_tokens = total_loss + loss, total_tokens + n
    return total_loss, float(total_tokens)


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

    Under a default process group of several ranks (``reference-loss`` under ``composer -n``
    or ``torchrun``) every rank holds a full copy of the model and forwards every
    ``world``-th batch; the loss sums and token counts are all-reduced in float64, so every
    rank returns the single-process result up to float summation order. An error on one rank
    is reported on every rank (no rank waits for it).

    Args:
        model_dir: Hugging Face model directory (config, weights, tokenizer).
        data_dir: directory holding ``<domain>/eval`` MDS splits.
        domains: domains to evaluate, in this order; default: every domain with an eval split,
            sorted by name.
        max_seq_len: truncation length.
        batch_size: sequences per forward pass.
        max_samples: evaluate at most this many samples per domain.
        device: torch device (this rank's, under a process group).
        model: an already loaded model to use instead of loading ``model_dir``.
        dtype: dtype ``model_dir``'s weights are loaded in (``float32``, ``bfloat16``,
            ``float16``); the cross-entropy is computed in float32 from the logits either way.

    Returns:
        ``{domain: loss}`` in the order of ``domains``.
    """
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rank, world = _rank_and_world()
    data_dir = Path(data_dir)
    error = None
    try:
        available = _discover_domains(data_dir)
        if domains is not None:
            _check_domains(domains, available, f"{data_dir} (<domain>/eval splits)")
        domains = list(domains) if domains is not None else available
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}, got {dtype!r}")
        if model is None:
            model_dir = model_path(model_dir)  # a missing directory: a clear error, first
        tokenizer = None
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError):
            tokenizer = None  # Token-id shards do not need one.
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, torch_dtype=getattr(torch, dtype)
            )
        model = model.to(device).eval()
        pad_id = 0
        if tokenizer is not None and tokenizer.pad_token_id is not None:
            pad_id = tokenizer.pad_token_id
        split_dirs = {domain: _eval_split_dir(data_dir, domain) for domain in domains}
        for split_dir in split_dirs.values():  # every domain before the first forward pass
            check_split_tokenizer(read_split_meta(split_dir), tokenizer, f"eval split {split_dir}")
    except Exception as caught:  # any error: every rank must reach _agree
        error = caught
    _agree("loading the model and checking the data", error, [])

    def forward(batch: list[np.ndarray]) -> tuple[float, int]:
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

    results: dict[str, float] = {}
    for domain, split_dir in split_dirs.items():
        sums, error = [0.0, 0.0], None
        try:
            samples = read_mds_token_samples(split_dir, tokenizer, max_samples)
            bar = progress(samples, desc=f"eval {domain}", unit="sample", total=max_samples)
            sums = list(_domain_sums(forward, bar, max_seq_len, batch_size, rank, world))
        except Exception as caught:  # any error: every rank must reach _agree
            error = caught
        total_loss, total_tokens = _agree(f"evaluating domain {domain!r}", error, sums)
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


def _rank_device(device: str, local_rank: int) -> str:
    """This rank's device under a launcher: ``cuda`` is ``cuda:LOCAL_RANK``, ``cpu`` stays."""
    if device == "cpu":
        return device
    if device == "cuda":
        return f"cuda:{local_rank}"
    raise UsageError(
        f"--device {device} under a launcher of several processes: give --device cuda (each "
        "rank takes cuda:LOCAL_RANK) or --device cpu"
    )


@contextmanager
def _launched_process_group(device: str, timeout_s: float) -> Iterator[None]:
    """The default process group of the launched processes, for the block: nccl on a GPU, else gloo.

    The launcher's environment (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``)
    says where to meet. Not Composer's ``dist.initialize_dist``: its GPU device turns TF32
    matmuls on, which would make the ranks' losses differ from one process's.
    """
    backend = "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # NCCL's collectives run on this device
        backend = "nccl"
    torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _check_outputs(args: argparse.Namespace) -> None:
    """Fails before any evaluation when ``--out`` or ``--json`` cannot be written."""
    for option, target in (("--out", args.out), ("--json", args.json)):
        if target is None:
            continue
        key = f"reference-loss {option}"
        if is_remote(target):
            object_store_of(target, key)
        else:
            check_output_file(target, key)


def _losses(
    args: argparse.Namespace, device: str, rank: int
) -> tuple[dict[str, float], dict[str, tuple[float, float, float]]]:
    """The per-domain losses the arguments ask for, and the fit of each (empty unless --fit)."""
    error = None
    try:
        if rank == 0:  # the rank that writes them
            _check_outputs(args)
    except OutputPathError as caught:  # every rank must reach _agree
        error = caught
    _agree("checking --out and --json", error, [])
    if args.recipe is not None and not args.domains:
        args.domains = recipe_domains(args.recipe)
    if args.fit is None:
        result = evaluate_domain_losses(
            args.model,
            args.data,
            domains=args.domains,
            max_seq_len=args.max_seq_len,
            batch_size=args.batch_size,
            max_samples=args.max_samples,
            device=device,
            dtype=args.dtype,
        )
        return result, {}
    sizes, per_domain = _load_fit_file(Path(args.fit))
    if args.domains:
        _check_domains(args.domains, list(per_domain), f"{args.fit} (losses)")
        per_domain = {d: per_domain[d] for d in args.domains}
    fits = {domain: fit_scaling_law(sizes, values) for domain, values in per_domain.items()}
    result = {domain: predict_loss(params, args.target_params) for domain, params in fits.items()}
    return result, fits


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
    # Launched by `composer -n N` or torchrun (their environment variables; 1 without): the
    # evaluation is split over the ranks; only global rank 0 prints and writes. A fit is
    # instant, so under a launcher every rank computes it without a process group.
    rank, launched = dist.get_global_rank(), args.model is not None and dist.get_world_size() > 1
    device = _rank_device(args.device, dist.get_local_rank()) if launched else args.device
    try:
        if launched:
            with _launched_process_group(device, args.dist_timeout):
                result, fits = _losses(args, device, rank)
        else:
            result, fits = _losses(args, device, rank)
    except (OSError, ValueError, RuntimeError) as error:
        # OSError covers a missing file or model (interface.ModelPathError); ValueError a
        # fit file, a recipe or shards that do not hold what they should (a domain they do not
        # have is named with the ones they have); RuntimeError another rank's failure.
        print(f"error: {error}", file=sys.stderr)
        return 1
    if rank != 0:
        return 0
    if fits:
        print(f"{'domain':<20} {'a':>12} {'b':>8} {'c':>8} {'L(target)':>10}", file=out)
        for domain, (a, b, c) in fits.items():
            print(f"{domain:<20} {a:>12.4g} {b:>8.4f} {c:>8.4f} {result[domain]:>10.4f}", file=out)
    else:
        print(f"{'domain':<20} {'loss':>8}", file=out)
        for domain, value in result.items():
            print(f"{domain:<20} {value:>8.4f}", file=out)
    snippet = target_loss_snippet(result)
    print("\n" + snippet, end="", file=out)
    # Local paths or object-store URIs (s3://...).
    losses_json = json.dumps(result, indent=2) + "\n"
    for target, option, text in ((args.out, "--out", snippet), (args.json, "--json", losses_json)):
        if target is None:
            continue
        try:
            write_text_output(target, text, f"reference-loss {option}")
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
            "`dynamic_batch_loading` YAML snippet. Under a launcher (`composer -n N $(which "
            "composer-shear) reference-loss ...`, or torchrun) --model's evaluation is split "
            "over the ranks (a full model copy on each, on cuda:LOCAL_RANK with --device cuda), "
            "with the same losses as one process; only rank 0 prints and writes."
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
        help="torch device of the evaluation (cpu, cuda, cuda:1; under a launcher cpu, or cuda "
        "for each rank's cuda:LOCAL_RANK)",
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
    parser.add_argument(
        "--out", default=None, help="also write the YAML snippet to this file (or s3://... URI)"
    )
    parser.add_argument(
        "--json",
        default=None,
        help="also write the losses as JSON, {domain: loss} at full precision, to this file "
        "(or s3://... URI)",
    )
    parser.add_argument(
        "--dist-timeout",
        type=positive_int,
        default=600,
        help="seconds a rank waits for the others at a collective under a launcher (the "
        "ranks meet after loading and after each domain; a rank that fails is reported by "
        "all at once, this bounds a rank that hangs or dies); LLM Foundry's default",
    )
    parser.set_defaults(func=_run)
    return parser
