"""First-order Taylor importance and ``prune-oneshot --method taylor / --layer-score``.

The planted-unit tests edit weights of a tiny random model: a zeroed MLP unit (no output, so
its Taylor score is exactly 0) and a *catastrophic* one, a pair of MLP units whose outputs
cancel on a hidden channel that nothing else writes; the lm_head reads that channel into one
token's logit. Removing either unit of the pair lets the channel through and the loss jumps
by several nats (the planting is checked), while the unit's activation is unremarkable, so
activation magnitude does not rank it high.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from composer_shear.cli import build_parser
from composer_shear.data.calibration import calibration_batches
from composer_shear.export.oneshot import (
    oneshot_plan,
    prune_oneshot,
    prune_oneshot_to_dir,
)
from composer_shear.export.units import read_kept_units
from composer_shear.export.writer import EXPORT_INFO
from composer_shear.families import get_family
from composer_shear.pruning.importance import collect_importance, collect_taylor_importance
from tests.pruning_helpers import make_tiny_run_inputs
from tests.test_oneshot import CASES, batches, one_less, plant, shape_of
from tests.tiny_models import tiny_model

LAYER, PAIR, USELESS, CHANNEL, TOKEN = 1, (3, 9), 5, 7, 1


@torch.no_grad()
def plant_catastrophic_pair(model, scale: float = 10.0) -> None:
    """MLP units ``PAIR`` of layer ``LAYER`` cancel on ``CHANNEL``; ``USELESS`` is zeroed.

    ``CHANNEL`` is emptied everywhere else (embedding column, every o_proj / down_proj row),
    so in the planted model it is exactly 0 in the residual stream; the lm_head reads it into
    ``TOKEN``'s logit (a token the calibration batches never hold). The pair shares one
    input row with ``up = gate`` (activation ``silu(z) z >= 0``) and writes ``+scale`` and
    ``-scale``: without either unit the channel is ``-scale * a`` and ``TOKEN`` wins.
    """
    family = get_family(model)
    layers = [family.layer_modules(layer) for layer in family.layer_list(model)]
    family.embedding(model).weight[:, CHANNEL] = 0.0
    for mods in layers:
        mods.o_proj.weight[CHANNEL] = 0.0
        mods.down_proj.weight[CHANNEL] = 0.0
    mods = layers[LAYER]
    first, second = PAIR
    mods.up_proj.weight[first] = mods.gate_proj.weight[first]
    for weight in (mods.gate_proj.weight, mods.up_proj.weight):
        weight[second] = weight[first]
        weight[USELESS] = 0.0
    mods.down_proj.weight[:, PAIR] = 0.0
    mods.down_proj.weight[CHANNEL, first] = scale
    mods.down_proj.weight[CHANNEL, second] = -scale
    family.lm_head_module(model).weight[TOKEN, CHANNEL] = -scale


@torch.no_grad()
def mean_loss(model, data) -> float:
    return sum(model(input_ids=ids, labels=ids).loss.item() for ids in data) / len(data)


def test_taylor_ranks_a_catastrophic_unit_first_and_a_useless_one_last():
    model = tiny_model("llama_gqa").eval()
    data = batches(model.config.vocab_size, n=4)
    assert all((ids != TOKEN).all() for ids in data)
    before = mean_loss(model, data)
    plant_catastrophic_pair(model)
    planted = mean_loss(model, data)
    down = get_family(model).layer_modules(get_family(model).layer_list(model)[LAYER]).down_proj
    column = down.weight[:, PAIR[0]].clone()
    with torch.no_grad():
        down.weight[:, PAIR[0]] = 0.0
    removed = mean_loss(model, data)
    with torch.no_grad():
        down.weight[:, PAIR[0]] = column
    # The planting does what it claims: harmless in place, catastrophic when removed.
    assert abs(planted - before) < 0.05 and removed > planted + 5.0, (before, planted, removed)

    taylor = collect_taylor_importance(model, data).intermediate[LAYER]
    ranking = taylor.argsort(descending=True).tolist()
    assert set(ranking[:2]) == set(PAIR)
    assert ranking[-1] == USELESS and taylor[USELESS] == 0.0
    # Activation magnitude sees an ordinary unit (the reason for a gradient-aware baseline).
    activation = collect_importance(model, data).intermediate[LAYER]
    assert int((activation > activation[PAIR[0]]).sum()) >= 10
    # One-shot at one unit less per layer: Taylor drops the useless unit, keeps the pair.
    target = {"intermediate_size": model.config.intermediate_size - 1}
    kept = oneshot_plan(model, target, collect_taylor_importance(model, data)).kept_intermediate
    assert USELESS not in kept[LAYER].tolist() and set(PAIR) <= set(kept[LAYER].tolist())


@pytest.mark.parametrize("family, kind", CASES)
def test_taylor_removes_planted_useless_units(family, kind):
    """Every family and unit kind: a unit that contributes nothing scores 0 and is cut."""
    model = tiny_model(family).eval()
    index = plant(model, kind)
    importance = collect_taylor_importance(model, batches(model.config.vocab_size))
    plan = oneshot_plan(model, one_less(model, kind), importance)
    shape = shape_of(model)
    if kind == "layers":
        assert index not in plan.kept_layers
    elif kind == "intermediate":
        assert all(index not in row.tolist() for row in plan.kept_intermediate)
    elif kind == "hidden":
        assert index not in plan.kept_hidden.tolist()
    elif kind == "kv_heads":
        assert all(index not in row.tolist() for row in plan.kept_kv)
    else:
        n_rep = shape.heads_per_group
        removed = {1} if shape.is_mha else {g * n_rep + 1 for g in range(shape.num_key_value_heads)}
        assert all(not removed & set(row.tolist()) for row in plan.kept_heads)


def test_taylor_computes_no_weight_gradient():
    model = tiny_model("qwen2")
    frozen = {name for name, p in model.named_parameters() if name.endswith("q_proj.bias")}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    importance = collect_taylor_importance(model, batches(model.config.vocab_size))
    assert all(param.grad is None for param in model.parameters())
    # requires_grad is restored as it was (a mix here).
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    assert importance.tokens == 3 * 2 * 24
    for scores in (importance.heads, importance.intermediate, importance.hidden):
        assert torch.isfinite(scores).all() and (scores > 0).any()


def test_prune_oneshot_taylor_with_block_influence_layers(tiny_tokenizer_dir, tmp_path):
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    target = {"num_hidden_layers": 2, "intermediate_size": 48}
    options = dict(calibration_tokens=512, max_seq_len=32, batch_size=4, seed=3)
    out = tmp_path / "taylor_bi"
    prune_oneshot_to_dir(
        model_dir,
        out,
        target,
        data=data_dir,
        method="taylor",
        layer_score="block_influence",
        **options,
    )
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["method"] == "oneshot-taylor" and info["layer_score"] == "block_influence"
    # The same calibration batches: layers ranked by block influence, MLP units by Taylor.
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    data = calibration_batches(data_dir, 512, 32, batch_size=4, seed=3)
    taylor = collect_taylor_importance(model, data)
    block_influence = collect_importance(model, data).layers
    plan = oneshot_plan(model, target, replace(taylor, layers=block_influence))
    kept = read_kept_units(out)["kept"]
    assert kept["layers"] == plan.kept_layers
    assert kept["intermediate"] == plan.kept_intermediate.tolist()
    # Not vacuous: Taylor's own layer ranking differs from block influence here.
    assert oneshot_plan(model, target, taylor).kept_layers != plan.kept_layers


def test_method_and_layer_score_errors(tmp_path):
    model = tiny_model("llama_gqa")
    with pytest.raises(ValueError, match="method must be one of"):
        prune_oneshot(model, {"num_hidden_layers": 3}, method="fisher")
    with pytest.raises(ValueError, match="not random"):
        prune_oneshot(model, {"num_hidden_layers": 3}, method="random", layer_score="taylor")
    with pytest.raises(ValueError, match="layer score must be one of"):
        prune_oneshot(model, {"num_hidden_layers": 3}, batches(512), layer_score="cosine")
    with pytest.raises(ValueError, match="taylor importance needs calibration batches"):
        prune_oneshot(model, {"num_hidden_layers": 3}, method="taylor")
    with pytest.raises(ValueError, match="required for method taylor"):
        prune_oneshot_to_dir("unused", tmp_path / "out", {"num_hidden_layers": 3}, method="taylor")


def test_cli_help_names_the_methods_and_defaults():
    # The real parser: composer-shear's formatter shows every default.
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["prune-oneshot", "--help"])
    flat = " ".join(out.getvalue().split())
    for fragment in (
        "{activation,taylor,random}",
        "(default: activation)",
        "{block_influence,taylor}",
        "activation: block_influence, taylor: taylor",
        "(default: 65536)",
        "(default: 2048)",
    ):
        assert fragment in flat, fragment
