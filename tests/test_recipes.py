"""Static checks of every GPU recipe under ``yamls/<model>/`` (``yamls/tests/`` excluded).

No training and no model weights: each recipe is loaded and resolved with OmegaConf, passed
through LLM Foundry's own config processing (``TrainConfig``, unknown top-level keys rejected),
its components are built or their arguments bound to the registered classes, and its pruning
target is resolved against the source model's real ``config.json`` (``tests/fixtures/configs``).
The conventions the checks rely on are documented in ``yamls/README.md``.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from composer.core import Time, TimeUnit
from composer.distributed.mosaic_parallelism import get_mixed_precision
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from composer_shear.shape import ModelShape, ShapeError

REPO = Path(__file__).resolve().parents[1]
YAML_ROOT = REPO / "yamls"
FIXTURES = REPO / "tests" / "fixtures" / "configs"
EXCLUDED_FOLDERS = {"tests"}

# Recipe folder -> source config fixture, for recipes without `variables.source_config`.
FOLDER_FIXTURES = {
    "llama2-7b": "Llama-2-7b-hf",
    "llama3.1-8b": "Llama-3.1-8B",
    "mistral-7b": "Mistral-7B-v0.1",
    "qwen2-7b": "Qwen2-7B",
    "smollm2": "SmolLM2-135M",
}
OUR_COMPONENTS = {
    "targeted_pruning",
    "oneshot_pruning",
    "knowledge_distillation",
    "dynamic_batch_loading",
    "pruned_hf_export",
    "multi_domain",
}
# `<role>: <anything> — N params, M non-embedding`, then a line of `key=value` dimensions.
COUNT_LINE = re.compile(
    r"^#\s*(?P<role>source|target)\b[^\n]*?(?P<total>\d[\d,]*) params, "
    r"(?P<non_embedding>\d[\d,]*) non-embedding\s*\n#\s*(?P<dims>(?:\w+=\d+\s*)+)$",
    re.MULTILINE,
)
DIM_KEYS = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "intermediate": "intermediate_size",
}


class RecipeError(AssertionError):
    """A recipe that would fail (or silently misbehave) when launched."""


@dataclass
class Recipe:
    """A loaded recipe: its path, header comment, raw config and resolved dict."""

    path: Path
    header: str
    raw: DictConfig
    cfg: dict[str, Any]
    filled: list[str]

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def variables(self) -> dict[str, Any]:
        return self.cfg.get("variables") or {}

    @property
    def pruning(self) -> dict[str, Any] | None:
        return (self.cfg.get("algorithms") or {}).get("targeted_pruning")

    @property
    def oneshot(self) -> dict[str, Any] | None:
        return (self.cfg.get("algorithms") or {}).get("oneshot_pruning")

    @property
    def distillation(self) -> dict[str, Any] | None:
        return (self.cfg.get("algorithms") or {}).get("knowledge_distillation")

    @property
    def callbacks(self) -> dict[str, Any]:
        return self.cfg.get("callbacks") or {}

    @property
    def eval_loaders(self) -> list[dict[str, Any]]:
        loaders = self.cfg.get("eval_loader")
        if loaders is None:
            return []
        return loaders if isinstance(loaders, list) else [loaders]


def recipe_paths() -> list[Path]:
    """Every training recipe YAML in ``yamls/*/`` except the test folder.

    ``eval*.yaml`` files are ``llmfoundry eval`` configs, checked by
    ``tests/test_downstream.py`` against LLM Foundry's ``EvalConfig``.
    """
    paths = [
        p
        for pattern in ("*/*.yaml", "*/*.yml")
        for p in YAML_ROOT.glob(pattern)
        if p.parent.name not in EXCLUDED_FOLDERS and not p.name.startswith("eval")
    ]
    return sorted(paths)


def _header(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#") and line.strip():
            break
        lines.append(line)
    return "\n".join(lines)


def _is_interpolation(raw: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(raw, parent) if parent else raw
    return OmegaConf.is_interpolation(node, leaf)


def _fill_missing(raw: DictConfig) -> list[str]:
    """Fills ``???`` values so the recipe resolves; only ``variables.*`` may be missing.

    A missing ``variables.target_loss`` gets one value per training domain, anything else a
    placeholder string (paths).
    """
    # missing_keys also lists interpolations that point at a missing value: those are fine.
    literal = [key for key in OmegaConf.missing_keys(raw) if not _is_interpolation(raw, key)]
    outside = [key for key in literal if not key.startswith("variables.")]
    if outside:
        raise RecipeError(f"mandatory values (???) outside variables: {outside}")
    missing = sorted(literal)
    for key in missing:
        if key.endswith("target_loss"):
            domains = OmegaConf.select(raw, "train_loader.dataset.domains")
            OmegaConf.update(raw, key, {str(d): 2.0 for d in domains}, merge=False)
        else:
            OmegaConf.update(raw, key, f"/placeholder/{key}", merge=False)
    return missing


def load_recipe(path: Path, text: str | None = None) -> Recipe:
    """Loads, fills mandatory ``variables`` and resolves a recipe (``text`` overrides the file)."""
    text = path.read_text(encoding="utf-8") if text is None else text
    raw = OmegaConf.create(text)
    if not isinstance(raw, DictConfig):
        raise RecipeError(f"{path}: not a mapping")
    filled = _fill_missing(raw)
    cfg = OmegaConf.to_container(raw, resolve=True, throw_on_missing=True)
    return Recipe(path=path, header=_header(text), raw=raw, cfg=cfg, filled=filled)


def source_fixture(recipe: Recipe) -> str:
    """The source model's fixture name: ``variables.source_config``, else from the folder."""
    name = recipe.variables.get("source_config") or FOLDER_FIXTURES.get(recipe.path.parent.name)
    if name is None:
        raise RecipeError(
            f"{recipe.name}: set variables.source_config (a tests/fixtures/configs/*.json name) "
            f"or use one of the folders {sorted(FOLDER_FIXTURES)}"
        )
    if not (FIXTURES / f"{name}.json").is_file():
        raise RecipeError(f"{recipe.name}: no fixture tests/fixtures/configs/{name}.json")
    return name


def source_shape(fixture: str) -> ModelShape:
    """The :class:`ModelShape` of a fixture config, biases from the family declaration."""
    from transformers import AutoConfig

    from composer_shear.families import get_family

    config = AutoConfig.for_model(**json.loads((FIXTURES / f"{fixture}.json").read_text()))
    return get_family(config).shape(config)


def recipe_target(recipe: Recipe) -> dict[str, int] | None:
    """The pruning target (one-shot, or for CPT ``variables.pruned_shape``); None if none."""
    if recipe.pruning is not None:
        return recipe.pruning["target_shape"]
    if recipe.oneshot is not None:
        return recipe.oneshot["target_shape"]
    return recipe.variables.get("pruned_shape")


def _bind(target: Any, kwargs: dict[str, Any], what: str, **fixed: Any) -> None:
    try:
        inspect.signature(target).bind(**fixed, **kwargs)
    except TypeError as error:
        raise RecipeError(f"{what}: {error}") from error


# ------------------------------------------------------------------------------------ checks


def check_train_config(recipe: Recipe) -> None:
    """LLM Foundry's own processing accepts the config (top-level keys, batch sizes, loaders)."""
    from llmfoundry.command_utils.train import validate_config
    from llmfoundry.utils.config_utils import (
        TRAIN_CONFIG_KEYS,
        TrainConfig,
        make_dataclass_and_log_config,
    )

    unknown = sorted(set(recipe.cfg) - TRAIN_CONFIG_KEYS)
    if unknown:
        raise RecipeError(f"{recipe.name}: top-level keys TrainConfig rejects: {unknown}")
    try:
        _, train_cfg = make_dataclass_and_log_config(
            copy.deepcopy(recipe.raw), TrainConfig, TRAIN_CONFIG_KEYS, transforms="all"
        )
        validate_config(train_cfg)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"{recipe.name}: {error}") from error


def check_components(recipe: Recipe) -> None:
    """Our components build from their sections; every other name resolves and binds."""
    from composer.utils.parallelism import FSDPConfig
    from llmfoundry import registry

    from composer_shear.callbacks.dynamic_batch_loading import DynamicBatchLoading
    from composer_shear.callbacks.pruned_hf_export import PrunedHFExport
    from composer_shear.distillation.algorithm import KnowledgeDistillation
    from composer_shear.export.oneshot_job import OneshotPruning
    from composer_shear.pruning.algorithm import TargetedPruning

    cfg = recipe.cfg
    ours = {
        "targeted_pruning": TargetedPruning,
        "oneshot_pruning": OneshotPruning,
        "knowledge_distillation": KnowledgeDistillation,
        "dynamic_batch_loading": DynamicBatchLoading,
        "pruned_hf_export": PrunedHFExport,
    }
    for name, kwargs in (cfg.get("algorithms") or {}).items():
        cls = registry.algorithms.get(name)
        if name in ours:
            assert cls is ours[name], f"registry maps {name} to {cls}"
            cls(**(kwargs or {}))
        else:
            _bind(cls, kwargs or {}, f"{recipe.name}: algorithms.{name}")
    for name, kwargs in recipe.callbacks.items():
        if name in ours:
            assert registry.callbacks.get(name) is ours[name]
            ours[name](**(kwargs or {}))
        elif name in registry.callbacks:
            _bind(registry.callbacks.get(name), kwargs or {}, f"{recipe.name}: callbacks.{name}")
        else:
            cls = registry.callbacks_with_config.get(name)
            _bind(cls, kwargs or {}, f"{recipe.name}: callbacks.{name}", config={})

    model = dict(cfg["model"])
    model_cls = registry.models.get(model.pop("name"))
    _bind(model_cls, model, f"{recipe.name}: model", tokenizer=None)
    optimizer = dict(cfg["optimizer"])
    _bind(registry.optimizers.get(optimizer.pop("name")), optimizer, "optimizer", params=[])
    scheduler = dict(cfg["scheduler"])
    _bind(registry.schedulers.get(scheduler.pop("name")), scheduler, f"{recipe.name}: scheduler")

    for loader in [cfg["train_loader"], *recipe.eval_loaders]:
        kwargs = {k: v for k, v in loader.items() if k not in ("name", "label")}
        builder = registry.dataloaders.get(loader["name"])
        _bind(builder, kwargs, f"{recipe.name}: loader {loader.get('label', 'train')}",
              tokenizer=None, device_batch_size=1)  # fmt: skip
        if loader["name"] == "multi_domain":
            from composer_shear.data import builder as md

            allowed = md.DATASET_KEYS | getattr(md, "EXTRA_KEYS", set())
            allowed |= getattr(md, "STREAMING_KEYS", set())
            unknown = sorted(set(loader["dataset"]) - allowed)
            if unknown:
                raise RecipeError(f"{recipe.name}: unknown multi_domain dataset keys {unknown}")

    fsdp = cfg.get("fsdp_config")
    if fsdp is not None:
        FSDPConfig(**fsdp)
    mixed = cfg["model"].get("init_device") == "mixed"
    if mixed and not (fsdp and fsdp.get("sync_module_states")):
        raise RecipeError(f"{recipe.name}: init_device mixed needs sync_module_states")
    if (recipe.pruning is not None or recipe.oneshot is not None) and fsdp is not None:
        if fsdp.get("state_dict_type", "full") != "full":
            raise RecipeError(f"{recipe.name}: pruning checkpoints must be full for export")
        if not fsdp.get("use_orig_params", True):
            raise RecipeError(f"{recipe.name}: targeted_pruning needs use_orig_params")


def check_registry_names() -> None:
    """LLM Foundry's registries resolve our names (entry points installed)."""
    from llmfoundry import registry

    assert registry.algorithms.get("targeted_pruning").__name__ == "TargetedPruning"
    assert registry.algorithms.get("knowledge_distillation").__name__ == "KnowledgeDistillation"
    assert registry.algorithms.get("oneshot_pruning").__name__ == "OneshotPruning"
    assert registry.callbacks.get("dynamic_batch_loading").__name__ == "DynamicBatchLoading"
    assert registry.callbacks.get("pruned_hf_export").__name__ == "PrunedHFExport"
    assert callable(registry.dataloaders.get("multi_domain"))


def check_target_shape(recipe: Recipe) -> None:
    """The target resolves against the source config; the header's counts match."""
    target = recipe_target(recipe)
    if target is None:
        return
    source = source_shape(source_fixture(recipe))
    try:
        resolved = source.resolve_target(target)
    except ShapeError as error:
        raise RecipeError(f"{recipe.name}: {error}") from error
    found = {m["role"]: m for m in COUNT_LINE.finditer(recipe.header)}
    if "target" not in found:
        raise RecipeError(
            f"{recipe.name}: the header needs '# target: ... — N params, M non-embedding' and a "
            "'# layers=.. hidden=.. heads=.. kv_heads=.. head_dim=.. intermediate=..' line"
        )
    for role, shape in (("source", source), ("target", resolved)):
        match = found.get(role)
        if match is None:
            continue
        total = int(match["total"].replace(",", ""))
        non_embedding = int(match["non_embedding"].replace(",", ""))
        expected = (shape.num_params(), shape.num_non_embedding_params())
        if (total, non_embedding) != expected:
            raise RecipeError(
                f"{recipe.name}: header {role} says {total:,} / {non_embedding:,} params but "
                f"ModelShape gives {expected[0]:,} / {expected[1]:,}"
            )
        dims = dict(pair.split("=") for pair in match["dims"].split())
        for key, value in dims.items():
            if key not in DIM_KEYS:
                raise RecipeError(f"{recipe.name}: unknown dimension {key!r} in the header")
            if getattr(shape, DIM_KEYS[key]) != int(value):
                raise RecipeError(
                    f"{recipe.name}: header {role} {key}={value} but the shape has "
                    f"{getattr(shape, DIM_KEYS[key])}"
                )


def check_domains(recipe: Recipe) -> None:
    """Domains, proportions, target losses and eval labels agree."""
    train = recipe.cfg["train_loader"]
    if train["name"] != "multi_domain":
        if "dynamic_batch_loading" in recipe.callbacks:
            raise RecipeError(f"{recipe.name}: dynamic_batch_loading needs multi_domain")
        return
    dataset = train["dataset"]
    domains = list(dataset["domains"])
    if len(set(domains)) != len(domains):
        raise RecipeError(f"{recipe.name}: duplicate domains {domains}")
    proportion = dataset.get("proportion")
    if proportion is not None:
        if len(proportion) != len(domains):
            raise RecipeError(
                f"{recipe.name}: {len(proportion)} proportions, {len(domains)} domains"
            )
        if abs(sum(proportion) - 1.0) > 1e-6 or min(proportion) < 0:
            raise RecipeError(f"{recipe.name}: proportions {proportion} do not sum to 1")
    dbl = recipe.callbacks.get("dynamic_batch_loading")
    if dbl is None:
        return
    target_loss = dbl.get("target_loss")
    if target_loss is not None and not isinstance(target_loss, dict):
        raise RecipeError(f"{recipe.name}: target losses must be a mapping {{domain: loss}}")
    if target_loss is not None and list(target_loss) != domains:
        raise RecipeError(
            f"{recipe.name}: target losses for {list(target_loss)}, domains {domains}"
        )
    if target_loss is not None and min(target_loss.values()) <= 0:
        raise RecipeError(f"{recipe.name}: target losses must be positive")
    labels = [loader.get("label") for loader in recipe.eval_loaders]
    if sorted(map(str, labels)) != sorted(domains):
        raise RecipeError(f"{recipe.name}: eval labels {labels} != train domains {domains}")
    for loader in recipe.eval_loaders:
        ds = loader["dataset"]
        if list(ds["domains"]) != [loader["label"]] or ds.get("split", "train") == "train":
            raise RecipeError(
                f"{recipe.name}: eval loader {loader['label']} must read only its own domain "
                "from a held-out split"
            )
    if "eval_interval" not in recipe.cfg:
        raise RecipeError(f"{recipe.name}: set eval_interval (it is the update interval)")


def check_cpt_pairing(recipe: Recipe, siblings: list[Recipe]) -> None:
    """A CPT recipe reads the export of a pruning recipe with the same shape and domains."""
    if recipe.pruning is not None or "pruned_shape" not in recipe.variables:
        return
    shape = recipe.variables["pruned_shape"]
    partners = [r for r in siblings if r.pruning and r.pruning["target_shape"] == shape]
    if not partners:
        raise RecipeError(f"{recipe.name}: no pruning recipe in its folder has {shape}")
    exports = {r.callbacks.get("pruned_hf_export", {}).get("save_folder") for r in partners}
    if recipe.cfg["model"]["pretrained_model_name_or_path"] not in exports:
        raise RecipeError(f"{recipe.name}: model path is not the export of {exports}")
    for partner in partners:
        domains = partner.cfg["train_loader"]["dataset"]["domains"]
        if domains != recipe.cfg["train_loader"]["dataset"]["domains"]:
            raise RecipeError(f"{recipe.name}: domains differ from {partner.name}")


def check_pruning_eval(recipe: Recipe) -> None:
    """Pruning evaluates the model being trained (expected shape), as the released recipes do.

    Dynamic batch loading reads these eval losses; a cut to the final target early in pruning
    would steer the mixture by whichever domain an arbitrary cut hurts most.
    """
    pruning = recipe.pruning
    if pruning is None:
        return
    eval_at = pruning.get("eval_at", "expected")
    if eval_at != "expected":
        raise RecipeError(f"{recipe.name}: targeted_pruning.eval_at is {eval_at!r}, not expected")


def check_distillation(recipe: Recipe) -> None:
    """A KD teacher is the source model: ``source`` while pruning, a model path in CPT."""
    kd = recipe.distillation
    if kd is None:
        return
    teacher = str(kd.get("teacher", "source"))
    if recipe.pruning is None and teacher == "source":
        raise RecipeError(
            f"{recipe.name}: knowledge_distillation.teacher=source without targeted_pruning "
            "distils the model into itself; give the unpruned source model's directory / name"
        )
    model_path = recipe.cfg["model"]["pretrained_model_name_or_path"]
    if recipe.pruning is None and teacher == model_path:
        raise RecipeError(f"{recipe.name}: the KD teacher is the model being trained")


def check_landing(recipe: Recipe) -> None:
    """Pruning hardens before its last step, so that it ends exactly on the target.

    ``harden_at: auto`` (the default) hardens at half of the run or at the end of the
    Lagrangian warm-up, whichever is later; ``never`` is the paper's schedule, an ablation.
    """
    pruning = recipe.pruning
    if pruning is None:
        return
    harden_at = pruning.get("harden_at", "auto")
    if harden_at in (None, "never"):
        raise RecipeError(f"{recipe.name}: harden_at {harden_at}: the run ends off the target")
    end = Time.from_timestring(str(recipe.cfg["max_duration"]))
    points = [harden_at] if harden_at != "auto" else ["0.5dur", pruning["lagrangian_warmup"]]
    for point in points:
        when = Time.from_timestring(str(point))
        fraction = when.value if when.unit == TimeUnit.DURATION else when.value / end.value
        if when.unit not in (TimeUnit.DURATION, end.unit) or fraction >= 1.0:
            raise RecipeError(f"{recipe.name}: hardening at {point} is not before {end}")


def check_gate_precision(recipe: Recipe) -> None:
    """A pruning recipe keeps FSDP's compute parameters (the gates too) in float32.

    ``targeted_pruning`` refuses anything else at INIT; this catches it before a launch.
    """
    fsdp = recipe.cfg.get("fsdp_config")
    if (recipe.pruning is None and recipe.oneshot is None) or not fsdp:
        return
    setting = fsdp.get("mixed_precision", "DEFAULT")
    _, param_dtype, _, _ = get_mixed_precision(recipe.cfg["precision"], setting)
    if param_dtype not in (None, torch.float32):
        raise RecipeError(
            f"{recipe.name}: mixed_precision {setting} puts the gates in {param_dtype}"
        )


def check_oneshot(recipe: Recipe) -> None:
    """A one-shot job trains nothing: one batch, and the export writes the cut."""
    if recipe.oneshot is None:
        return
    if recipe.pruning is not None:
        raise RecipeError(f"{recipe.name}: oneshot_pruning and targeted_pruning in one run")
    if str(recipe.cfg["max_duration"]) != "1ba":
        raise RecipeError(f"{recipe.name}: a one-shot job runs max_duration: 1ba")
    if "pruned_hf_export" not in recipe.callbacks:
        raise RecipeError(f"{recipe.name}: a one-shot job needs pruned_hf_export to write the cut")


CHECKS = (
    check_train_config,
    check_components,
    check_target_shape,
    check_domains,
    check_pruning_eval,
    check_distillation,
    check_landing,
    check_gate_precision,
    check_oneshot,
)

# ------------------------------------------------------------------------------------- tests

RECIPES = recipe_paths()


def test_recipes_exist():
    folders = {p.parent.name for p in RECIPES}
    assert {"llama2-7b", "llama3.1-8b", "mistral-7b", "qwen2-7b"} <= folders
    pruning = [p for p in RECIPES if load_recipe(p).pruning is not None]
    assert len(pruning) >= 5
    oneshot = {p.relative_to(YAML_ROOT).as_posix() for p in RECIPES if load_recipe(p).oneshot}
    assert {"llama3.1-8b/oneshot_3b.yaml", "smollm2/oneshot.yaml"} <= oneshot


def test_registry_names():
    check_registry_names()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_recipe(path, check):
    check(load_recipe(path))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_cpt_reads_a_pruning_export(path):
    siblings = [load_recipe(p) for p in RECIPES if p.parent == path.parent]
    check_cpt_pairing(load_recipe(path), siblings)


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("*.json")))
def test_fixture_configs_build(name):
    shape = source_shape(name)
    assert shape.num_attention_heads % shape.num_key_value_heads == 0
    # Published sizes of the source models.
    expected = {
        "Llama-2-7b-hf": 6_738_415_616,
        "Llama-3.1-8B": 8_030_261_248,
        "Mistral-7B-v0.1": 7_241_732_096,
        "Qwen2-7B": 7_615_616_512,
        "SmolLM2-135M": 134_515_008,
    }
    if name in expected:
        assert shape.num_params() == expected[name]


def test_missing_values_stop_a_launch():
    """``???`` under variables fails at resolution, i.e. when `llmfoundry train` starts."""
    path = YAML_ROOT / "llama3.1-8b" / "prune_3b.yaml"
    raw = OmegaConf.create(path.read_text())
    assert {"variables.data_local", "variables.target_loss"} <= OmegaConf.missing_keys(raw)
    errors = (MissingMandatoryValue, InterpolationToMissingValueError)
    with pytest.raises(errors, match=r"target_loss|data_local"):
        OmegaConf.to_container(raw, resolve=True, throw_on_missing=True)


# ----------------------------------------------------------- the checks can fail (mutations)

BASE = YAML_ROOT / "llama2-7b" / "prune_2.7b.yaml"


def _mutated(edit) -> Recipe:
    recipe = load_recipe(BASE)
    raw = copy.deepcopy(recipe.raw)
    edit(raw)
    return Recipe(
        path=BASE,
        header=recipe.header,
        raw=raw,
        cfg=OmegaConf.to_container(raw, resolve=True),
        filled=[],
    )


ONESHOT = YAML_ROOT / "llama3.1-8b" / "oneshot_3b.yaml"


@pytest.mark.parametrize(
    ("edit", "check", "message"),
    [
        (lambda r: r.__setitem__("max_duration", "10ba"), check_oneshot, "1ba"),
        (lambda r: r.callbacks.pop("pruned_hf_export"), check_oneshot, "pruned_hf_export"),
        (lambda r: r.fsdp_config.__setitem__("mixed_precision", "DEFAULT"), check_gate_precision,
         "puts the gates in torch.bfloat16"),
        (lambda r: r.algorithms.oneshot_pruning.__setitem__("method", "magnitude"),
         check_components, "method must be one of"),
        (lambda r: r.algorithms.oneshot_pruning.target_shape.__setitem__("hidden_size", 8192),
         check_target_shape, "larger than the source"),
    ],
    ids=["trains", "no-export", "bf16-gates", "bad-method", "target-larger"],
)  # fmt: skip
def test_broken_oneshot_recipe_is_caught(edit, check, message):
    recipe = load_recipe(ONESHOT)
    raw = copy.deepcopy(recipe.raw)
    edit(raw)
    broken = Recipe(ONESHOT, recipe.header, raw, OmegaConf.to_container(raw, resolve=True), [])
    with pytest.raises((RecipeError, ValueError), match=message):
        check(broken)


def test_base_recipe_passes():
    for check in CHECKS:
        check(load_recipe(BASE))


@pytest.mark.parametrize(
    ("edit", "check", "message"),
    [
        (lambda r: r.algorithms.targeted_pruning.target_shape.__setitem__("hidden_size", 8192),
         check_target_shape, "larger than the source"),
        (lambda r: r.algorithms.targeted_pruning.target_shape.__setitem__(
            "num_key_value_heads", 3), check_target_shape, "divisible"),
        (lambda r: r.algorithms.targeted_pruning.target_shape.__setitem__(
            "intermediate_size", 6400), check_target_shape, "ModelShape gives"),
        (lambda r: r.variables.__setitem__("proportion", [0.7, 0.045, 0.045, 0.02, 0.045,
                                                          0.025, 0.15]),
         check_domains, "sum to 1"),
        (lambda r: r.variables.__setitem__("target_loss", {"cc": 1.9, "github": 0.7}),
         check_domains, "target losses"),
        (lambda r: r.eval_loader.pop(), check_domains, "eval labels"),
        (lambda r: r.__setitem__("pruning_steps", 3200), check_train_config, "pruning_steps"),
        (lambda r: r.fsdp_config.__setitem__("state_dict_type", "sharded"), check_components,
         "full for export"),
        (lambda r: r.algorithms.targeted_pruning.__setitem__("gate_lr", 0.0), check_components,
         "positive"),
        (lambda r: r.algorithms.targeted_pruning.__setitem__("eval_at", "target"),
         check_pruning_eval, "not expected"),
        (lambda r: r.algorithms.targeted_pruning.__setitem__("harden_at", "never"),
         check_landing, "ends off the target"),
        (lambda r: r.algorithms.targeted_pruning.__setitem__("lagrangian_warmup", "3200ba"),
         check_landing, "not before"),
        (lambda r: r.fsdp_config.__setitem__("mixed_precision", "DEFAULT"), check_gate_precision,
         "puts the gates in torch.bfloat16"),
    ],
    ids=["target-larger", "gqa-invalid", "stale-count", "proportion-sum", "target-loss-len",
         "missing-eval-domain", "unknown-top-level-key", "sharded-pruning-ckpt", "bad-gate-lr",
         "eval-at-target", "never-hardens", "warmup-to-the-end",
         "bf16-gates"],
)  # fmt: skip
def test_broken_recipe_is_caught(edit, check, message):
    recipe = _mutated(edit)
    with pytest.raises((RecipeError, ValueError), match=message):
        check(recipe)


def test_header_without_counts_is_caught():
    recipe = load_recipe(BASE)
    recipe.header = "\n".join(
        line for line in recipe.header.splitlines() if "non-embedding" not in line
    )
    with pytest.raises(RecipeError, match="header needs"):
        check_target_shape(recipe)


def test_kd_recipes_exist_for_both_stages():
    kd = {p.relative_to(YAML_ROOT).as_posix() for p in RECIPES if load_recipe(p).distillation}
    assert {
        "smollm2/prune_kd.yaml",
        "smollm2/cpt_kd.yaml",
        "llama2-7b/prune_2.7b_kd.yaml",
        "llama2-7b/cpt_2.7b_kd.yaml",
    } <= kd


@pytest.mark.parametrize(
    ("teacher", "message"),
    [("source", "distils the model into itself"), (None, "model being trained")],
)
def test_cpt_distilling_itself_is_caught(teacher, message):
    recipe = load_recipe(YAML_ROOT / "llama2-7b" / "cpt_2.7b_kd.yaml")
    check_distillation(recipe)
    kd = recipe.cfg["algorithms"]["knowledge_distillation"]
    kd["teacher"] = teacher or recipe.cfg["model"]["pretrained_model_name_or_path"]
    with pytest.raises(RecipeError, match=message):
        check_distillation(recipe)


def test_bad_kd_option_is_caught():
    recipe = load_recipe(YAML_ROOT / "llama2-7b" / "prune_2.7b_kd.yaml")
    recipe.cfg["algorithms"]["knowledge_distillation"]["alpha"] = 2.0
    with pytest.raises(ValueError, match=r"knowledge_distillation\.alpha"):
        check_components(recipe)


def test_cpt_pointing_elsewhere_is_caught():
    cpt = load_recipe(YAML_ROOT / "llama2-7b" / "cpt_2.7b.yaml")
    siblings = [load_recipe(p) for p in RECIPES if p.parent.name == "llama2-7b"]
    check_cpt_pairing(cpt, siblings)
    cpt.cfg["model"]["pretrained_model_name_or_path"] = "./runs/other/pruned_hf"
    with pytest.raises(RecipeError, match="not the export"):
        check_cpt_pairing(cpt, siblings)
