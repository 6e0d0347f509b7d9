"""Our components are found by LLM Foundry's registries through the package's entry points."""

import pytest
from omegaconf import OmegaConf

from composer_shear import __version__
from composer_shear.callbacks.dynamic_batch_loading import DynamicBatchLoading
from composer_shear.callbacks.pruned_hf_export import PrunedHFExport
from composer_shear.data.builder import build_multi_domain_dataloader
from composer_shear.distillation.algorithm import KnowledgeDistillation
from composer_shear.pruning.algorithm import TargetedPruning
from composer_shear.report.metrics import JSONLMetricsLogger

YAML = """
algorithms:
  targeted_pruning:
    target_shape: {num_hidden_layers: 2, hidden_size: 32}
    lagrangian_warmup: 10ba
callbacks:
  dynamic_batch_loading: {update_type: doremi, target_loss: [1.0, 2.0]}
  pruned_hf_export: {save_folder: /tmp/out, save_interval: 5ba}
loggers:
  jsonl_metrics: {path: /tmp/metrics.jsonl}
"""


@pytest.mark.parametrize(
    "registry, name, obj",
    [
        ("algorithms", "targeted_pruning", TargetedPruning),
        ("algorithms", "knowledge_distillation", KnowledgeDistillation),
        ("callbacks", "dynamic_batch_loading", DynamicBatchLoading),
        ("callbacks", "pruned_hf_export", PrunedHFExport),
        ("dataloaders", "multi_domain", build_multi_domain_dataloader),
        ("loggers", "jsonl_metrics", JSONLMetricsLogger),
    ],
)
def test_entry_points_reach_llmfoundry_registries(registry, name, obj):
    from llmfoundry import registry as registries

    assert getattr(registries, registry).get(name) is obj


def test_builders_construct_components_from_yaml():
    from llmfoundry.utils.builders import build_algorithm, build_callback, build_logger

    cfg = OmegaConf.to_container(OmegaConf.create(YAML), resolve=True)
    algorithm = build_algorithm("targeted_pruning", cfg["algorithms"]["targeted_pruning"])
    assert isinstance(algorithm, TargetedPruning)
    assert algorithm.target_shape == {"num_hidden_layers": 2, "hidden_size": 32}
    for name, kwargs in cfg["callbacks"].items():
        callback = build_callback(name, kwargs)
        assert type(callback).__name__ in {"DynamicBatchLoading", "PrunedHFExport"}
    assert isinstance(
        build_logger("jsonl_metrics", cfg["loggers"]["jsonl_metrics"]), JSONLMetricsLogger
    )


def test_bad_algorithm_config_is_rejected_by_the_builder():
    from llmfoundry.utils.builders import build_algorithm

    from composer_shear.shape import ShapeError

    with pytest.raises(ShapeError, match="Unknown target_shape key"):
        build_algorithm("targeted_pruning", {"target_shape": {"hidden": 32}})


def test_console_script(capsys):
    from composer_shear.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert __version__ in capsys.readouterr().out
    assert main([]) == 2  # no command: a usage error, the help on stderr
    out = capsys.readouterr().err
    for command in ("smollm2", "tokenize", "reference-loss", "export", "report", "demo"):
        assert command in out
