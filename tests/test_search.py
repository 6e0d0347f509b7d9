"""Target by parameter budget: the candidate shapes, their scoring, and the CLI on SmolLM2."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from composer_shear.export.oneshot import oneshot_plan
from composer_shear.export.search import candidate_shapes, cut_loss, search_shape
from composer_shear.export.surgery import prune_model
from composer_shear.families import get_family
from composer_shear.pruning.importance import collect_importance
from composer_shear.shape import ShapeError
from tests.pruning_helpers import REPO, VENV_BIN
from tests.tiny_models import tiny_model

FIXTURES = REPO / "tests" / "fixtures" / "configs"
DEMO_SHAPE = {
    "num_hidden_layers": 24,
    "hidden_size": 512,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "intermediate_size": 1152,
}


def _shape(name: str):
    config = AutoConfig.for_model(**json.loads((FIXTURES / f"{name}.json").read_text()))
    return get_family(config).shape(config)


def test_candidates_fit_the_budget_and_include_the_demo_shape():
    source = _shape("SmolLM2-135M")
    budget = 80_241_152
    candidates = candidate_shapes(source, budget, slack=0.03)
    assert candidates
    for c in candidates:
        s = c.shape
        assert 0.97 * budget <= c.params == s.num_params() <= budget
        assert s.num_attention_heads % s.num_key_value_heads == 0
        assert s.hidden_size % 64 == 0 and s.intermediate_size % 64 == 0
        assert s.num_hidden_layers >= 15 and s.num_attention_heads >= 3
    shapes = [{k: c.shape.config_updates()[k] for k in DEMO_SHAPE} for c in candidates]
    assert DEMO_SHAPE in shapes  # the demo's hand-picked shape is one of the largest at 24
    non_embedding = candidate_shapes(source, 60_000_000, non_embedding=True)
    assert all(c.params == c.shape.num_non_embedding_params() <= 60_000_000 for c in non_embedding)


def test_candidates_respect_what_the_family_cannot_prune():
    source = _shape("gemma-3-270m")  # layer targets are rejected for Gemma 3 (README)
    candidates = candidate_shapes(source, int(source.num_params() * 0.8))
    assert candidates
    assert {c.shape.num_hidden_layers for c in candidates} == {source.num_hidden_layers}


def test_a_budget_nothing_fits_is_an_error():
    with pytest.raises(ShapeError, match="no shape"):
        candidate_shapes(_shape("SmolLM2-135M"), 1_000_000)
    with pytest.raises(ShapeError, match="positive"):
        candidate_shapes(_shape("SmolLM2-135M"), 0)


def test_search_scores_every_candidate_and_picks_the_lowest_loss():
    model = tiny_model("llama_gqa").eval()
    source = get_family(model).shape(model.config)
    generator = torch.Generator().manual_seed(0)
    calibrate = [torch.randint(3, model.config.vocab_size, (2, 24), generator=generator)]
    held_out = [torch.randint(3, model.config.vocab_size, (2, 24), generator=generator)]
    importance = collect_importance(model, calibrate)

    def cut(shape):
        return prune_model(model, plan=oneshot_plan(model, shape.config_updates(), importance))

    budget = int(source.num_params() * 0.7)
    winner, scored = search_shape(source, budget, cut, held_out, slack=0.1, width_multiple=8)
    assert len(scored) > 1 and winner is scored[0]
    assert [c.loss for c in scored] == sorted(c.loss for c in scored)
    assert all(c.params <= budget for c in scored)
    # The table's losses are the cut models' real losses.
    assert winner.loss == pytest.approx(cut_loss(cut(winner.shape), held_out))


@pytest.mark.slow
def test_cli_target_params_on_smollm2(smollm2_dir, tmp_path):
    from composer_shear.data.prep import prepare_domains

    data = tmp_path / "data"
    prepare_domains(
        REPO / "data" / "sample_corpus", data, str(smollm2_dir), 64, domains=["code", "books"],
        verbose=False,
    )  # fmt: skip
    out = tmp_path / "searched"
    cmd = [
        str(VENV_BIN / "composer-shear"), "prune-oneshot", str(smollm2_dir), str(out),
        "--data", str(data), "--max-seq-len", "64", "--calibration-tokens", "1024",
        "--target-params", "80.25e6",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layers hidden" in proc.stdout  # the table
    info = json.loads((out / "composer_shear_export.json").read_text())
    losses = [row["loss"] for row in info["search"]]
    assert losses == sorted(losses) and len(losses) > 1
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.num_hidden_layers == info["search"][0]["shape"]["num_hidden_layers"]
    assert 0.97 * 80.25e6 <= sum(p.numel() for p in loaded.parameters()) <= 80.25e6
    both = subprocess.run(
        [*cmd, "--target-shape", "hidden_size=512"], capture_output=True, text=True, cwd=REPO
    )
    assert both.returncode == 2 and "not several" in both.stderr
