"""The quality benchmark's bookkeeping, and the helpers every benchmark shares.

The benchmark's cells take 7-50 minutes each, so what decides whether a result is valid must
be checked without running one: that seed 17 reproduces the recipes as written (the kept
results were made that way), that every method's overrides name real options (or options
being added, which the benchmark then refuses by name), that the compute count follows its
definition, that the kept results still tabulate to the committed figures, and that the
curve aggregates seeds per cell. The shared training step and batches run on a tiny model.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from composer_shear.pruning.algorithm import TargetedPruning
from composer_shear.pruning.masking import attach_gates
from tests.tiny_models import VOCAB_SIZE, build_tiny_tokenizer, tiny_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "quality"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_quality", REPO / "benchmarks" / "bench_quality.py"
    )
    module = importlib.util.module_from_spec(spec)
    # Registered first, as an import would: its dataclasses look their module up by name.
    sys.modules["bench_quality"] = module
    spec.loader.exec_module(module)  # puts benchmarks/ on the path for its siblings
    return module


@pytest.fixture(scope="module")
def tables(bench):
    return importlib.import_module("quality_tables")


@pytest.fixture(scope="module")
def common(bench):
    return importlib.import_module("common")


@pytest.fixture(scope="module")
def settings(bench):
    return bench.load_settings()


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


def test_every_method_names_real_options_or_pending_ones(bench, settings):
    """A typo in quality.yaml would otherwise surface only after a long run (or never).

    Options issue 31 is adding may be missing from this checkout: the benchmark then refuses
    the method by name; any other unknown key fails here.
    """
    largest = max(settings["budgets"].values())
    for name, spec in settings["methods"].items():
        assert spec["route"] in bench.ROUTES, name
        assert 0 < float(spec.get("prune_fraction", settings["prune_fraction"])) < 1, name
        assert float(spec.get("steps_factor", 1.0)) > 0, name
        problems = bench.method_problems(settings, name, largest)
        assert set(problems) <= set(bench.PENDING_OPTIONS), (name, problems)


def test_a_method_with_a_missing_option_is_refused_by_name_before_anything_runs(bench, settings):
    cfg = copy.deepcopy(settings)
    cfg["methods"]["typo"] = {
        "route": "maskonly", "gate_lr": 0.3, "prune_steps": 26,
        "prune": ["algorithms.targeted_pruning.gate_lrr=0.3"],
    }  # fmt: skip
    cfg["methods"]["bad_oneshot"] = {"route": "oneshot", "importance": "no_such_score"}
    cfg["methods"]["no_cpt"] = {"route": "maskonly", "gate_lr": 0.3, "prune_steps": 60}
    problems = bench.method_problems(cfg, "typo", 512)
    assert "algorithms.targeted_pruning.gate_lrr" in problems
    assert "invalid choice: 'no_such_score'" in next(
        iter(bench.method_problems(cfg, "bad_oneshot", 512).values())
    )
    assert "no CPT step" in bench.method_problems(cfg, "no_cpt", 60)["plan"]
    with pytest.raises(bench.MethodUnavailable) as error:
        bench.check_methods(cfg, ["oneshot", "typo", "bad_oneshot"], 512)
    message = str(error.value)
    assert "typo: algorithms.targeted_pruning.gate_lrr" in message
    lines = message.splitlines()
    assert any(line.startswith("  bad_oneshot: ") for line in lines)
    assert not any(line.startswith("  oneshot:") for line in lines)  # it can run
    # Every method the settings ship either runs or is refused for a pending option only.
    bench.check_methods(settings, ["oneshot", "learned_harden_p10", "oneshot_units_p25"], 512)
    if "freeze_weights" not in inspect.signature(TargetedPruning).parameters:
        with pytest.raises(bench.MethodUnavailable, match=r"freeze_weights.*issue 31"):
            bench.check_methods(settings, ["maskonly_lr0.3_s51"], 512)


def test_oneshot_cli_check_accepts_what_the_benchmark_passes(bench, settings):
    args = bench.oneshot_args(settings, "activation", 17, units=Path("units_dir"))
    assert bench.oneshot_cli_error(args) is None
    assert "--target-shape" in args and "--layer-score" not in args
    error = bench.oneshot_cli_error(["--calibration-tokens", "many"])
    assert error is not None and "--calibration-tokens" in error


def test_a_oneshot_method_can_cut_to_its_own_shape_at_the_same_budget(bench, settings):
    """``oneshot_searched`` cuts the search's shape; its parameters match the recipe target's."""
    from transformers import LlamaConfig

    from composer_shear.shape import ModelShape

    searched = bench.cell_settings(settings, bench.plan_cell(settings, "oneshot_searched", 17, 512))
    default = bench.cell_settings(settings, bench.plan_cell(settings, "oneshot", 17, 512))
    assert default["target_shape"] == settings["target_shape"]
    assert searched["target_shape"] != settings["target_shape"]
    args = bench.oneshot_args(searched, "activation", 17)
    assert bench.oneshot_cli_error(args) is None
    assert "num_hidden_layers=20" in args[args.index("--target-shape") + 1]
    config = REPO / "tests" / "fixtures" / "configs" / "SmolLM2-135M.json"
    source = ModelShape.from_config(LlamaConfig.from_json_file(config))
    params = {
        name: source.resolve_target(cfg["target_shape"]).num_params()
        for name, cfg in (("searched", searched), ("default", default))
    }
    # The search's budget is the demo target's parameter count, within its 3% tolerance.
    assert abs(params["searched"] / params["default"] - 1) <= 0.03, params


def test_plan_splits_each_route_and_keeps_the_budget(bench, settings):
    p10 = bench.plan_cell(settings, "learned_harden_p10", 17, 512)
    assert (p10.prune_steps, p10.cpt_steps, p10.budget) == (51, 461, 512)
    eqc = bench.plan_cell(settings, "oneshot_eqc_p10", 18, 240)
    assert (eqc.prune_steps, eqc.cpt_steps, eqc.budget, eqc.seed) == (0, 255, 240, 18)
    mask = bench.plan_cell(settings, "maskonly_lr0.3_s51", 17, 240)
    assert (mask.prune_steps, mask.cpt_steps, mask.route) == (51, 189, "maskonly")
    with pytest.raises(ValueError, match="leave no CPT step"):
        bench.plan_cell(settings, "maskonly_lr0.2_s128", 17, 120)


def test_maskonly_stage_freezes_the_weights_and_hardens_on_its_last_step(bench, settings):
    cell = bench.plan_cell(settings, "maskonly_lr0.5_s26", 18, 512)
    overrides = bench.prune_overrides(settings, cell)
    prune = _apply(bench.PRUNE_YAML, overrides).algorithms.targeted_pruning
    assert prune.freeze_weights is True and prune.gate_lr == 0.5
    assert prune.init == "activation" and list(prune.log_alpha_range) == pytest.approx(
        [-4.605170185988091, 4.605170185988091]
    )
    assert (prune.init_log_alpha, prune.init_pruned_log_alpha) == (4.0, -4.0)
    # Hardened at the start of step 26 of 26 (batch 25): the cut is where the gates ended.
    assert prune.harden_at == "25ba"
    assert dict(prune.target_shape) == bench.recipe_target(bench.PRUNE_YAML)
    assert _gate_seed(_apply(bench.PRUNE_YAML, overrides)) == bench.gate_seed(18)
    kd = bench.plan_cell(settings, "maskonly_kd_lr0.3_s51", 17, 512)
    assert "algorithms.targeted_pruning.objective=distill" in bench.prune_overrides(settings, kd)
    assert "algorithms.targeted_pruning.objective=distill" not in overrides


def test_landing_reads_the_end_of_pruning_and_the_hardening_batch(bench, tmp_path):
    rows = [
        {"step": 10, "metrics": {"pruning/intermediate/max_row_deviation_units": 40.0,
                                 "pruning/hidden/max_row_deviation_units": 3.0}},
        {"step": 25, "metrics": {"pruning/hardening/intermediate/max_row_deviation_units": 7.0,
                                 "pruning/hardening/hidden/max_row_deviation_units": 0.0,
                                 "pruning/intermediate/max_row_deviation_units": 0.0}},
        {"step": 26, "metrics": {"pruning/hidden/max_row_deviation_units": 0.0,
                                 "metrics/eval/code/LanguageCrossEntropy": 5.0}},
    ]  # fmt: skip
    metrics = tmp_path / "prune.jsonl"
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    at_end, hardening = bench.landing(metrics)
    assert at_end == {"intermediate": 0.0, "hidden": 0.0}
    assert hardening == {"intermediate": 7.0, "hidden": 0.0}
    metrics.write_text(json.dumps(rows[0]) + "\n")
    assert bench.landing(metrics) == ({"intermediate": 40.0, "hidden": 3.0}, None)


def test_compute_per_token_of_each_route(bench, settings):
    def per_token(name):
        return bench.cell_flops_per_token(settings, bench.plan_cell(settings, name, 17, 512))

    learned = {"prune": 6.0, "calibration": 2.0, "cpt": 6.0, "cpt_teacher": 0.0}
    assert per_token("learned_harden_p10") == learned
    assert per_token("learned_harden_kd") == {**learned, "prune": 8.0, "cpt_teacher": 2.0}
    # Frozen weights: forward + activations' gradients, no weight-gradient GEMMs.
    assert per_token("maskonly_lr0.3_s51") == {**learned, "prune": 4.0}
    # The distillation objective adds the frozen model's own forward.
    assert per_token("maskonly_kd_lr0.3_s51") == {**learned, "prune": 6.0}
    assert per_token("oneshot") == {**learned, "prune": 0.0}
    assert per_token("oneshot_taylor") == {**learned, "prune": 0.0, "calibration": 4.0}
    assert per_token("oneshot_block_influence")["calibration"] == 2.0


def test_the_target_is_read_from_the_recipe(bench, common, settings, tmp_path):
    recipe = OmegaConf.load(common.SMOLLM2_PRUNE_YAML)
    written = OmegaConf.to_container(recipe.algorithms.targeted_pruning.target_shape)
    assert common.recipe_target() == written == settings["target_shape"]
    assert "target_shape" not in yaml.safe_load(bench.SETTINGS.read_text())
    OmegaConf.save(OmegaConf.create({"algorithms": {"gradient_clipping": {}}}), tmp_path / "r.yaml")
    with pytest.raises(ValueError, match=r"no algorithms\.targeted_pruning\.target_shape"):
        common.recipe_target(tmp_path / "r.yaml")


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


def test_point_flops_counts_pruning_on_the_source_and_cpt_on_the_target(tables):
    learned = _record("learned", 17, prune_steps=2, cpt_steps=8, loss=4.0)
    total = 10 * 1024
    expected = 6 * 100 * 2048 + 2 * 100 * 16 + 6 * 60 * 8192
    assert tables.point_flops(learned, total) == expected
    # Part-way through pruning only the source has trained.
    assert tables.point_flops(learned, 1024) == 6 * 100 * 1024 + 2 * 100 * 16
    # A distillation teacher adds a source forward per training token.
    assert tables.point_flops({**learned, "kd": True}, total) == expected + 2 * 100 * total
    # A mask-only stage: 4 N per token on the source (no weight gradients), the same CPT.
    mask_only = {**learned, "flops_per_token": {"prune": 4, "calibration": 2, "cpt": 6,
                                                "cpt_teacher": 0}}  # fmt: skip
    assert tables.point_flops(mask_only, total) == expected - 2 * 100 * 2048


def test_kept_results_keep_their_compute_and_tabulate_to_the_committed_figures(tables, settings):
    """The tables moved out of the runner: the kept results must read exactly as before."""
    budgets = tables.budget_results(RESULTS)
    assert {60, 120, 240, 512} <= set(budgets)
    for records in (r for budget in budgets.values() for r in budget.values()):
        for record in records:
            total = sum(record["tokens"].values())
            assert tables.point_flops(record, total) == pytest.approx(record["train_flops"])
    table, points = tables.curve_table(budgets, settings)
    assert table + "\n" == (RESULTS / "curve.md").read_text()
    assert "**4.124 ± 0.014** (257 TFLOPs; s17,18)" in table  # one-shot, 512 steps
    for steps in budgets:
        folder = RESULTS / f"{steps}steps"
        expected = (folder / "table.md").read_text()
        reference = tables.reference_losses(folder)
        assert tables.results_table(budgets[steps], settings, reference) + "\n" == expected
    prune_only = RESULTS / "512steps" / "prune_only"
    assert tables.prune_only_table(prune_only) + "\n" == (prune_only / "table.md").read_text()
    # The legend sits in its own band: it overlaps neither plot (their labels included).
    fig = tables.curve_figure(points, settings)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    assert len(fig.legends[0].get_texts()) == len(points)
    for axis in fig.axes:
        assert not legend.overlaps(axis.get_tightbbox(renderer)), axis.get_title()
    tables.plt.close(fig)


def test_machine_is_recorded_and_named_under_the_tables(bench, common, tables, settings, tmp_path):
    machine = common.machine_record()
    assert machine["torch_threads"] == torch.get_num_threads() >= 1
    assert machine["cpu"] and machine["logical_cpus"] >= 1
    assert machine["cpu"] in common.machine_line(machine)
    bench_ = bench.Bench(tmp_path, settings, tmp_path, tmp_path, {})
    record = bench.cell_record(bench_, bench.plan_cell(settings, "oneshot", 17, 240), x=1)
    assert record["machine"]["cpu"] == machine["cpu"] and record["x"] == 1
    assert record["tokens"] == {"prune": 0, "cpt": 240 * 1024}
    assert record["flops_per_token"]["prune"] == 0.0
    old = {"seed": 17}
    assert tables.machines_note([old]) == ""
    note = tables.machines_note([old, {"machine": machine}])
    assert machine["cpu"] in note and "1 cell(s) ran before machines were recorded" in note


def test_curve_aggregates_seeds_per_cell_and_leaves_missing_cells_empty(tables, settings, tmp_path):
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
            record["train_flops"] = tables.point_flops(record, (prune + cpt) * 1024)
            (folder / f"{method}-s{seed}.json").write_text(json.dumps(record))
    (tmp_path / "240steps").mkdir()
    record = _record("oneshot", 17, 0, 240, 4.2)
    record["train_flops"] = 1e12
    (tmp_path / "240steps" / "oneshot-s17.json").write_text(json.dumps(record))

    table = tables.write_curve(tmp_path, cfg)
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


def test_prune_only_table_shows_each_dimension_against_its_floors(tables, tmp_path):
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
    lines = tables.prune_only_table(tmp_path).splitlines()
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


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tiny_tokenizer(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def test_text_batches_are_real_text_of_the_asked_shape(common, tiny_tokenizer):
    batches = common.text_batches(tiny_tokenizer, 2, 16, 3)
    assert [tuple(b.shape) for b in batches] == [(2, 16)] * 3
    assert not torch.equal(batches[0], batches[1])
    # The first batch is the start of argparse's own source.
    assert tiny_tokenizer.decode(batches[0][0]) in Path(argparse.__file__).read_text()
    # Short text repeats (timing does not depend on which tokens a batch holds); ids are
    # taken modulo a small vocabulary.
    many = common.text_batches(tiny_tokenizer, 8, 256, 200, vocab=100)
    assert len(many) == 200 and all(int(b.max()) < 100 for b in many)


@pytest.mark.parametrize("distill", [False, True])
def test_shared_pruning_step_trains_weights_and_gates(common, tiny_tokenizer, distill):
    model = tiny_model("llama_gqa").train()
    teacher = None
    if distill:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    gates = attach_gates(model, {"intermediate_size": 32, "num_attention_heads": 2})
    weight = model.model.layers[0].mlp.up_proj.weight
    before_weight = weight.detach().clone()
    before_alpha = {n: g.log_alpha.detach().clone() for n, g in gates.gates.items()}
    step = common.pruning_train_step(model, gates, teacher, alpha=0.5, lr=1e-3)
    batches = common.text_batches(tiny_tokenizer, 2, 16, 3, vocab=VOCAB_SIZE)
    losses = [step(ids) for ids in batches]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(weight, before_weight)
    assert any(not torch.equal(g.log_alpha, before_alpha[n]) for n, g in gates.gates.items())
    if teacher is not None:
        # The teacher stays frozen: the step trains the student only.
        assert all(p.grad is None for p in teacher.parameters())
    plain = AutoModelForCausalLM.from_config(model.config).train()
    assert common.pruning_train_step(plain)(batches[0]) > 0
