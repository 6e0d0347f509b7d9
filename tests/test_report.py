"""JSONL metrics logger and run reports."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from composer import Callback, Trainer
from composer.core import Evaluator
from composer.models import ComposerClassifier
from torch.utils.data import DataLoader, TensorDataset

from composer_shear.report import JSONLMetricsLogger, build_report, read_metrics
from composer_shear.report import markdown as markdown_module
from composer_shear.report import metrics as metrics_module
from tests.tiny_models import save_tiny_checkpoint, tiny_model

DOMAINS = ["books", "code", "docs", "latex", "mail", "reference", "speeches"]
PRUNED = dict(
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    intermediate_size=48,
    hidden_size=48,
)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------ logger


class _LogOddValues(Callback):
    """Logs values of every kind the logger must handle."""

    def batch_end(self, state, logger):
        logger.log_metrics(
            {
                "custom/tensor": torch.tensor(0.5),
                "custom/int": 3,
                "custom/numpy": np.float32(1.5),
                "custom/nan": float("nan"),
                "custom/text": "not a number",
                "custom/vector": torch.ones(3),
            }
        )


def _tiny_trainer(path: str, run_name: str = "jsonl-test") -> Trainer:
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    train = DataLoader(TensorDataset(x, y), batch_size=8)
    evaluator = Evaluator(
        label="eval/code",  # llm-foundry's label for a list eval_loader entry `label: code`
        dataloader=DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8),
        metric_names=["MulticlassAccuracy"],
    )
    return Trainer(
        model=ComposerClassifier(torch.nn.Linear(8, 3), num_classes=3),
        train_dataloader=train,
        eval_dataloader=evaluator,
        eval_interval="2ba",
        max_duration="4ba",
        loggers=[JSONLMetricsLogger(path)],
        callbacks=[_LogOddValues()],
        run_name=run_name,
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        save_folder=None,
    )


def _resumable_trainer(path: Path, save: Path, max_duration: str, run_name: str) -> Trainer:
    """The tiny trainer with checkpoints every 2 batches and Composer's autoresume."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    evaluator = Evaluator(
        label="eval/code",
        dataloader=DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8),
        metric_names=["MulticlassAccuracy"],
    )
    return Trainer(
        model=ComposerClassifier(torch.nn.Linear(8, 3), num_classes=3),
        train_dataloader=DataLoader(TensorDataset(x, y), batch_size=8),
        eval_dataloader=evaluator,
        eval_interval="2ba",
        max_duration=max_duration,
        loggers=[JSONLMetricsLogger(str(path))],
        callbacks=[_LogOddValues()],
        run_name=run_name,
        seed=0,
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        save_folder=str(save),
        save_interval="2ba",
        save_overwrite=True,
        autoresume=True,
    )


def test_autoresume_keeps_the_metrics_once_per_step(tmp_path):
    """A run killed after batch 5 (last checkpoint: batch 4), autoresumed to batch 8."""
    straight_path = tmp_path / "straight.jsonl"
    trainer = _resumable_trainer(straight_path, tmp_path / "ckpt-straight", "8ba", "straight")
    trainer.fit()
    trainer.close()
    path = tmp_path / "metrics.jsonl"
    killed = _resumable_trainer(path, tmp_path / "ckpt", "5ba", "resumed")
    killed.fit()
    killed.close()
    assert read_metrics(path).get("custom/tensor")[0] == [1, 2, 3, 4, 5]
    # Killed, not finished: Composer's end-of-fit checkpoint at batch 5 never happened.
    (tmp_path / "ckpt" / "ep0-ba5-rank0.pt").unlink()
    (tmp_path / "ckpt" / "latest-rank0.pt").unlink()
    (tmp_path / "ckpt" / "latest-rank0.pt").symlink_to("ep0-ba4-rank0.pt")
    resumed = _resumable_trainer(path, tmp_path / "ckpt", "8ba", "resumed")
    assert int(resumed.state.timestamp.batch) == 4  # autoresumed from the batch-4 checkpoint
    resumed.fit()
    resumed.close()

    records = [line for line in read_lines(path) if "metrics" in line]
    straight = [line for line in read_lines(straight_path) if "metrics" in line]
    for name in ("loss/train/total", "custom/tensor", "time/batch",
                 "metrics/eval/code/MulticlassAccuracy"):  # fmt: skip
        steps = [r["step"] for r in records if name in r["metrics"]]
        assert len(steps) == len(set(steps)), (name, steps)  # no step written twice
        assert steps == [r["step"] for r in straight if name in r["metrics"]], name
    # Before and after the resume, the history is the uninterrupted run's (exact resumption).
    losses = read_metrics(path).get("loss/train/total")
    assert losses[0] == list(range(8))
    assert losses[1] == pytest.approx(read_metrics(straight_path).get("loss/train/total")[1])


def test_fresh_run_replaces_an_old_file_but_only_once_it_starts(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 99, "metrics": {"old": 1.0}}) + "\n")
    trainer = _tiny_trainer(str(path))
    # Opened at INIT without truncating: a job that dies before training loses nothing.
    assert read_metrics(path).has("old")
    trainer.fit()
    trainer.close()
    log = read_metrics(path)
    assert not log.has("old") and log.get("loss/train/total")[0] == [0, 1, 2, 3]


def test_logger_in_composer_trainer(tmp_path):
    trainer = _tiny_trainer(str(tmp_path / "{run_name}" / "metrics.jsonl"))
    trainer.fit()
    trainer.close()
    path = tmp_path / "jsonl-test" / "metrics.jsonl"
    lines = read_lines(path)

    assert "hyperparameters" in lines[0]
    assert lines[0]["hyperparameters"]["composer_version"]
    hparam_keys = [
        k for line in lines if "hyperparameters" in line for k in line["hyperparameters"]
    ]
    assert len(hparam_keys) == len(set(hparam_keys)), "each hyperparameter is written once"

    records = [line for line in lines if "metrics" in line]
    assert all(set(r) == {"step", "metrics"} for r in records)
    # Composer logs the train loss before it counts the batch (steps 0..3), and BATCH_END
    # callbacks and evals after (steps 1..4).
    loss_steps = [r["step"] for r in records if "loss/train/total" in r["metrics"]]
    assert loss_steps == [0, 1, 2, 3]
    assert [r["step"] for r in records if "custom/tensor" in r["metrics"]] == [1, 2, 3, 4]
    eval_steps = [
        r["step"] for r in records if "metrics/eval/code/MulticlassAccuracy" in r["metrics"]
    ]
    assert eval_steps == [2, 4]
    custom = next(r["metrics"] for r in records if "custom/tensor" in r["metrics"])
    assert custom == {
        "custom/tensor": 0.5,
        "custom/int": 3.0,
        "custom/numpy": 1.5,
        "custom/nan": None,
    }
    # The reader gives the same series back.
    metrics = read_metrics(path)
    assert metrics.get("loss/train/total")[0] == [0, 1, 2, 3]
    assert math.isnan(metrics.last("custom/nan"))
    assert metrics.hyperparameters["composer_version"]
    # Closed at trainer.close(): the destination holds no open file.
    destination = next(d for d in trainer.logger.destinations if isinstance(d, JSONLMetricsLogger))
    assert destination._file is None


def test_logger_writes_nothing_on_other_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_module.dist, "get_global_rank", lambda: 1)
    logger = JSONLMetricsLogger(str(tmp_path / "m" / "{run_name}.jsonl"))
    logger.init(SimpleNamespace(run_name="r"), None)
    logger.log_hyperparameters({"a": 1})
    logger.log_metrics({"x": 1.0}, step=1)
    logger.close(None, None)
    logger.post_close()
    assert not (tmp_path / "m").exists()


def test_logger_queues_until_init_and_flushes(tmp_path):
    logger = JSONLMetricsLogger(str(tmp_path / "a" / "b" / "{run_name}.jsonl"), flush_interval=100)
    logger.log_hyperparameters({"path": Path("/x"), "nested": {"t": torch.tensor(2.0)}})
    logger.log_metrics({"x": torch.tensor([1.0])}, step=0)  # before INIT: run name unknown
    state = SimpleNamespace(run_name="myrun", timestamp=SimpleNamespace(batch=7))
    logger.init(state, None)
    logger.log_metrics({"y": 2})  # no step given: the state's batch
    path = tmp_path / "a" / "b" / "myrun.jsonl"
    logger.eval_end(state, None)  # flushes although flush_interval was not reached
    assert read_lines(path) == [
        {"hyperparameters": {"path": "/x", "nested": {"t": 2.0}}},
        {"step": 0, "metrics": {"x": 1.0}},
        {"step": 7, "metrics": {"y": 2.0}},
    ]
    logger.close(state, None)
    logger.post_close()  # idempotent


def test_logger_is_built_from_llmfoundry_registry(tmp_path):
    from llmfoundry import registry
    from llmfoundry.utils.builders import build_logger

    if "jsonl_metrics" not in registry.loggers:
        registry.loggers.register("jsonl_metrics", func=JSONLMetricsLogger)
    # Same shape as `loggers: {jsonl_metrics: {path: ..., flush_interval: ...}}` in a YAML.
    built = build_logger("jsonl_metrics", {"path": str(tmp_path / "x.jsonl"), "flush_interval": 5})
    assert isinstance(built, JSONLMetricsLogger)
    assert built.flush_interval == 5


# ------------------------------------------------------------------------------ report


def _write_metrics(path: Path, prune: bool) -> None:
    logger = JSONLMetricsLogger(str(path))
    logger.log_hyperparameters({"max_duration": "30ba"})
    rng = np.random.default_rng(0)
    targets = {"layers": 0.5, "kv_heads": 0.5, "heads": 0.5, "intermediate": 0.5, "hidden": 0.25}
    for step in range(1, 31):
        if prune:
            progress = min(1.0, step / 10)
            metrics = {"loss/train/lm": 6 - step * 0.05 + rng.normal(0, 0.1)}
            metrics["loss/train/lagrangian"] = 0.01
            metrics["loss/train/total"] = metrics["loss/train/lm"] + 0.01
            for dim, target in targets.items():
                metrics[f"pruning/{dim}/expected_sparsity"] = target * progress * 0.9
                metrics[f"pruning/{dim}/target_sparsity"] = target * progress
                metrics[f"pruning/{dim}/lambda_1"] = -0.01 * step
                metrics[f"pruning/{dim}/lambda_2"] = 0.005 * step
                metrics[f"pruning/{dim}/lagrangian"] = 0.001
                metrics[f"pruning/{dim}/max_row_deviation_units"] = 0.0 if step >= 16 else 1.5
            metrics["pruning/hardened"] = float(step >= 16)
            metrics["pruning/expected_num_params"] = 120_000 - 1500 * step
            metrics["pruning/target_num_params"] = 80_000.0
            metrics["pruning/penalty"] = 0.01
        else:
            metrics = {"loss/train/total": 5 - step * 0.03 + rng.normal(0, 0.1)}
        logger.log_metrics(metrics, step=step)
        if step % 10 == 0:
            weights = rng.dirichlet(np.ones(len(DOMAINS)))
            dbl = {}
            for domain, weight in zip(DOMAINS, weights, strict=True):
                dbl[f"dynamic_batch_loading/weight/{domain}"] = float(weight)
                dbl[f"dynamic_batch_loading/eval_loss/{domain}"] = 4.0
                dbl[f"dynamic_batch_loading/excess_loss/{domain}"] = 0.5
                dbl[f"metrics/eval/{domain}/LanguageCrossEntropy"] = 4.0
            logger.log_metrics(dbl, step=step)
    logger.close(None, None)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("models")
    source = tiny_model("llama_gqa")
    dirs = {
        "source": save_tiny_checkpoint(source, tiny_tokenizer_dir, root / "source"),
        "pruned": save_tiny_checkpoint(
            tiny_model("llama_gqa", seed=1, **PRUNED), tiny_tokenizer_dir, root / "pruned"
        ),
        "cpt": save_tiny_checkpoint(
            tiny_model("llama_gqa", seed=2, **PRUNED), tiny_tokenizer_dir, root / "cpt"
        ),
    }
    counts = {
        "source": sum(p.numel() for p in source.parameters()),
        "pruned": sum(p.numel() for p in tiny_model("llama_gqa", **PRUNED).parameters()),
    }
    return dirs, counts


def _make_run(run: Path, model_dirs: dict[str, Path], cpt_regresses: str | None = None) -> Path:
    (run / "metrics").mkdir(parents=True)
    (run / "eval").mkdir()
    _write_metrics(run / "metrics" / "prune.jsonl", prune=True)
    _write_metrics(run / "metrics" / "cpt.jsonl", prune=False)
    losses = {
        "domains": DOMAINS,
        "source": {d: 2.0 + 0.1 * i for i, d in enumerate(DOMAINS)},
        "pruned": {d: 4.0 + 0.1 * i for i, d in enumerate(DOMAINS)},
        "cpt": {d: 3.0 + 0.1 * i for i, d in enumerate(DOMAINS)},
        "reference": {d: 2.8 + 0.1 * i for i, d in enumerate(DOMAINS)},
    }
    if cpt_regresses:
        losses["cpt"][cpt_regresses] = 5.0
    (run / "eval" / "losses.json").write_text(json.dumps(losses))
    info = {
        "model": "SmolLM2-135M-Instruct",
        "started": "2025-01-01T00:00:00",
        "total_seconds": 3725.0,
        "stages": {"materialise": 5.0, "tokenize": 20.0, "prune": 3000.0, "cpt": 700.0},
        "models": {name: str(path) for name, path in model_dirs.items()},
        "settings": {"prune": {"steps": 30, "batch": 8}, "seq_len": 256, "target": PRUNED},
    }
    (run / "run.json").write_text(json.dumps(info))
    return run


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file(), path
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"
        assert image.size[0] > 300 and image.size[1] > 200


PLOTS = ["eval_losses.png", "train_loss.png", "domain_weights.png", "sparsity.png", "lambdas.png"]


def test_build_report_full_run(tmp_path, model_dirs, monkeypatch):
    dirs, counts = model_dirs
    run = _make_run(tmp_path / "run", dirs)
    path = build_report(run)
    assert path == run / "report" / "report.md"
    text = path.read_text()

    assert text.startswith("# Sheared-LLaMA run report: SmolLM2-135M-Instruct")
    assert "| model | layers | hidden | heads | kv heads |" in text
    assert f"{counts['source']:,}" in text and f"{counts['pruned']:,}" in text
    assert "| pruned (before CPT) | 2 | 48 | 4 | 1 | 8 | 48 |" in text
    assert "## Per-domain eval loss" in text
    assert "| speeches | 2.600 | 4.600 | 3.600 | 3.400 | -1.000 | +0.200 |" in text
    assert "improved every domain" in text
    # Landing: hardened at step 16; exported 4.3 (mean) vs the last in-run eval 4.0.
    assert "worst row off by (units)" in text
    assert "**hardened** at step 16" in text
    assert "minus the last in-run pruning evaluation 4.000 = **+0.300 nats**" in text
    assert "1h 02m 05s" in text  # total time, in the summary and the timings table
    assert "| prune | 50m 00s | 81% |" in text
    assert "| `settings`" not in text and "`prune.steps`" in text
    assert "## Sample generations" in text and "`The capital of France is`" in text
    for name in PLOTS:
        assert f"]({name})" in text
        _assert_png(run / "report" / name)

    cache = json.loads((run / "report" / "generations.json").read_text())
    assert set(cache["models"]) == {"source", "pruned", "cpt"}
    assert all(len(m["completions"]) == 3 for m in cache["models"].values())

    # Rebuilding uses the cache: no model is loaded again.
    def fail(*args, **kwargs):
        raise AssertionError("generations should come from the cache")

    monkeypatch.setattr(markdown_module, "generate_samples", fail)
    assert "`The capital of France is`" in build_report(run).read_text()


def test_report_names_domains_cpt_did_not_improve(tmp_path, model_dirs):
    run = _make_run(tmp_path / "run", model_dirs[0], cpt_regresses="code")
    text = build_report(run, generations=False).read_text()
    assert "improved 6/7 domains; **not improved: code**" in text
    assert "Skipped (`--no-generations`)" in text


def test_report_of_empty_folder(tmp_path):
    text = build_report(tmp_path).read_text()
    assert "No `run.json`" in text
    assert "No `eval/losses.json`" in text
    assert "No `metrics/prune.jsonl`" in text
    assert "no data in this run" in text
    assert not list((tmp_path / "report").glob("*.png"))


def test_report_of_partial_and_broken_run(tmp_path, model_dirs):
    run = tmp_path / "run"
    (run / "metrics").mkdir(parents=True)
    (run / "eval").mkdir()
    _write_metrics(run / "metrics" / "prune.jsonl", prune=True)
    with (run / "metrics" / "prune.jsonl").open("a") as f:
        f.write('{"step": 31, "metr')  # killed mid-write
    (run / "eval" / "losses.json").write_text(
        json.dumps({"domains": ["code", "books"], "pruned": {"code": 4.0}})
    )
    (run / "run.json").write_text(
        json.dumps(
            {
                "models": {"source": str(model_dirs[0]["source"]), "pruned": str(tmp_path / "x")},
                "stages": {"prune": "n/a"},
            }
        )
    )
    text = build_report(run, generations=False).read_text()
    assert "skipped 1 unreadable line(s)" in text
    assert "pruned (before CPT): shape not available" in text
    assert "| code | 4.000 |" in text and "| books | n/a |" in text
    assert "domain_weights.png" in text
    assert "Continued pre-training" not in text  # no CPT numbers, no verdict
    _assert_png(run / "report" / "eval_losses.png")
    _assert_png(run / "report" / "sparsity.png")
    assert not (run / "report" / "lambdas.png").exists() or "lambdas.png)" in text


def test_cli(tmp_path, model_dirs, capsys):
    from composer_shear.cli import main

    run = _make_run(tmp_path / "run", model_dirs[0])
    assert main(["report", str(run), "--no-generations"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report" / "report.md")
    assert main(["report", str(tmp_path / "missing")]) == 1
