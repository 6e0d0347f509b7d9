"""The quality benchmark's bookkeeping: seeds, settings, compute and the cross-budget curve.

The benchmark's cells take 7-50 minutes each, so what decides whether a result is valid must
be checked without running one: that seed 17 reproduces the recipes as written (the kept
results were made that way), that every method's overrides name real recipe keys, that the
compute count follows its definition, and that the curve aggregates seeds per cell.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from composer_shear.pruning.algorithm import TargetedPruning

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_quality", REPO / "benchmarks" / "bench_quality.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def settings(bench):
    return yaml.safe_load(bench.SETTINGS.read_text())


def _apply(recipe: Path, overrides: list[str]):
    return OmegaConf.merge(OmegaConf.load(recipe), OmegaConf.from_dotlist(overrides))


def _gate_seed(cfg) -> int:
    default = inspect.signature(TargetedPruning).parameters["seed"].default
    return int(OmegaConf.select(cfg, "algorithms.targeted_pruning.seed", default=default))


@pytest.mark.parametrize("kd", [False, True])
def test_recipe_seed_runs_the_recipes_as_written(bench, kd):
    prune_yaml = bench.PRUNE_KD_YAML if kd else bench.PRUNE_YAML
    cpt_yaml = bench.CPT_KD_YAML if kd else bench.CPT_YAML
    written_prune, written_cpt = OmegaConf.load(prune_yaml), OmegaConf.load(cpt_yaml)
    prune = _apply(prune_yaml, bench.seed_overrides(bench.RECIPE_SEED, "prune"))
    cpt = _apply(cpt_yaml, bench.seed_overrides(bench.RECIPE_SEED, "cpt"))
    assert (
        prune.train_loader.dataset.shuffle_seed == written_prune.train_loader.dataset.shuffle_seed
    )
    assert _gate_seed(prune) == _gate_seed(written_prune)
    assert cpt.train_loader.dataset.shuffle_seed == written_cpt.train_loader.dataset.shuffle_seed


def test_another_seed_moves_data_order_and_gate_noise(bench):
    prune17 = _apply(bench.PRUNE_YAML, bench.seed_overrides(17, "prune"))
    prune18 = _apply(bench.PRUNE_YAML, bench.seed_overrides(18, "prune"))
    cpt17 = _apply(bench.CPT_YAML, bench.seed_overrides(17, "cpt"))
    cpt18 = _apply(bench.CPT_YAML, bench.seed_overrides(18, "cpt"))
    assert prune17.train_loader.dataset.shuffle_seed != prune18.train_loader.dataset.shuffle_seed
    assert _gate_seed(prune17) != _gate_seed(prune18)
    assert cpt17.train_loader.dataset.shuffle_seed != cpt18.train_loader.dataset.shuffle_seed
    with pytest.raises(ValueError, match="non-negative"):
        bench.seed_overrides(-1, "prune")


def test_every_method_names_real_recipe_keys(bench, settings):
    """A typo in quality.yaml would otherwise surface only after a long run (or never)."""
    for name, spec in settings["methods"].items():
        assert spec["route"] in {"learned", "oneshot", "scratch"}, name
        assert 0 < float(spec.get("prune_fraction", settings["prune_fraction"])) < 1, name
        assert float(spec.get("steps_factor", 1.0)) > 0, name
        kd = bool(spec.get("kd", False))
        for stage, recipe in (
            ("prune", bench.PRUNE_KD_YAML if kd else bench.PRUNE_YAML),
            ("cpt", bench.CPT_KD_YAML if kd else bench.CPT_YAML),
        ):
            written = OmegaConf.load(recipe)
            for override in spec.get(stage, []):
                key = override.split("=", 1)[0]
                assert OmegaConf.select(written, key) is not None, (
                    f"{name}: {override} names no key of {recipe.name}"
                )


def _record(method, seed, prune_steps, cpt_steps, loss, n_source=100, n_target=60):
    tokens = {"prune": prune_steps * 1024, "cpt": cpt_steps * 1024}
    record = {
        "method": method,
        "label": method,
        "seed": seed,
        "tokens": tokens,
        "calibration_tokens": 16,
        "flop_params": {"source": n_source, "target": n_target},
        "after_cpt": {"code": loss, "books": loss + 1.0},
    }
    return record


def test_point_flops_counts_pruning_on_the_source_and_cpt_on_the_target(bench):
    learned = _record("learned", 17, prune_steps=2, cpt_steps=8, loss=4.0)
    total = 10 * 1024
    expected = 6 * 100 * 2048 + 2 * 100 * 16 + 6 * 60 * 8192
    assert bench.point_flops(learned, total) == expected
    # Part-way through pruning only the source has trained.
    assert bench.point_flops(learned, 1024) == 6 * 100 * 1024 + 2 * 100 * 16
    # A distillation teacher adds a source forward per training token.
    assert bench.point_flops({**learned, "kd": True}, total) == expected + 2 * 100 * total


def test_curve_aggregates_seeds_per_cell_and_leaves_missing_cells_empty(bench, settings, tmp_path):
    cfg = {**settings, "global_batch_size": 8, "max_seq_len": 128}
    cells = {
        60: [("oneshot", 17, 0, 60, 4.5), ("learned_harden_p10", 17, 6, 54, 4.6)],
        120: [
            ("oneshot", 17, 0, 120, 4.4),
            ("learned_harden_p10", 17, 12, 108, 4.3),
            ("learned_harden_p10", 18, 12, 108, 4.1),
        ],
    }
    for steps, rows in cells.items():
        folder = tmp_path / f"{steps}steps"
        folder.mkdir()
        for method, seed, prune, cpt, loss in rows:
            record = _record(method, seed, prune, cpt, loss)
            record["train_flops"] = bench.point_flops(record, (prune + cpt) * 1024)
            (folder / f"{method}-s{seed}.json").write_text(json.dumps(record))
    (tmp_path / "240steps").mkdir()
    record = _record("oneshot", 17, 0, 240, 4.2)
    record["train_flops"] = 1e12
    (tmp_path / "240steps" / "oneshot-s17.json").write_text(json.dumps(record))

    table = bench.write_curve(tmp_path, cfg)
    lines = table.splitlines()
    assert "61,440 tokens (60 steps)" in lines[0] and "245,760 tokens (240 steps)" in lines[0]
    p10 = next(line for line in lines if settings["methods"]["learned_harden_p10"]["label"] in line)
    # Mean over domains per seed (4.3 + 5.3) / 2 = 4.8 and 4.6: mean 4.7, spread 0.1.
    assert "**4.700 ± 0.100**" in p10 and "s17,18" in p10
    assert p10.split("|")[-2].strip() == ""  # no 240-step cell
    oneshot = next(line for line in lines if settings["methods"]["oneshot"]["label"] in line)
    assert "**4.700** (1 TFLOPs; s17)" in oneshot
    assert (tmp_path / "curve.md").read_text().strip() == table
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_prune_only_table_shows_each_dimension_against_its_floors(bench, tmp_path):
    units = {
        dim: {"shared": 0.9, "shared_route": 0.8, "calibration": 0.85, "chance": 0.75}
        for dim in ("layers", "heads", "kv_heads", "intermediate", "hidden")
    }
    record = {
        "method": "learned_harden_p05",
        "seed": 18,
        "steps": {"prune": 26, "cpt": 486},
        "before_cpt": {"code": 5.0, "books": 6.0},
        "units_shared_with_oneshot": units,
    }
    (tmp_path / "learned_harden_p05-s18.json").write_text(json.dumps(record))
    oneshot = {**record, "method": "oneshot", "seed": 17, "units_shared_with_oneshot": None}
    (tmp_path / "oneshot-s17.json").write_text(json.dumps(oneshot))
    lines = bench.prune_only_table(tmp_path).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[2].count("|") == 10
    learned = next(line for line in lines if "learned_harden_p05" in line)
    assert "| 18 | 26 | 5.500 |" in learned and learned.count("0.900 / 0.800 / 0.850 (0.750)") == 5
    assert next(line for line in lines if "| oneshot |" in line).endswith("| - | - | - | - | - |")


@pytest.mark.slow
def test_units_shared_with_oneshot_reads_the_init_cut_as_unmoved(bench, smollm2_dir, tmp_path):
    """A learned export that kept its importance init's units shares all of them with the cut."""
    from composer_shear.data.prep import prepare_domains

    data = tmp_path / "data"
    prepare_domains(
        REPO / "data" / "sample_corpus", data, str(smollm2_dir), 64, domains=["code", "books"],
        verbose=False,
    )  # fmt: skip
    cfg = {
        "max_seq_len": 64,
        "calibration_tokens": 2048,
        "target_shape": {"num_hidden_layers": 24, "hidden_size": 512, "intermediate_size": 1152},
    }
    seed = 18
    pruned = tmp_path / "init_cut"
    bench.oneshot_cut(
        smollm2_dir, pruned, data, cfg, "activation", bench.gate_seed(seed), tmp_path / "cut.log"
    )
    units = bench.units_shared_with_oneshot(pruned, tmp_path / "run", smollm2_dir, data, cfg, seed)
    assert set(units) == {"layers", "heads", "kv_heads", "intermediate", "hidden"}
    for dim, row in units.items():
        assert row["shared"] == 1.0, (dim, row)
        # Against the route's cut (another calibration sample) the export fares exactly as
        # its own init cut does.
        assert row["shared_route"] == row["calibration"], (dim, row)
        assert 0.0 < row["chance"] <= row["calibration"] <= 1.0, (dim, row)
    assert units["hidden"]["chance"] == 512 / 576
    # The intermediate cut is seed-dependent at 2,048 calibration tokens: 1.0 would mean the
    # two cuts did not use different samples.
    assert units["intermediate"]["calibration"] < 1.0
    assert not (tmp_path / "run" / "models" / "oneshot_cut_init").exists()
