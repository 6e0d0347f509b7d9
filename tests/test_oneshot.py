"""One-shot importance pruning: planted unimportant units are the ones removed, every family."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from composer_shear.cli import main
from composer_shear.export.oneshot import (
    oneshot_plan,
    parse_target_shape,
    prune_oneshot,
    prune_oneshot_to_dir,
)
from composer_shear.export.surgery import prune_model
from composer_shear.export.units import kept_units_record, read_kept_units, units_plan
from composer_shear.families import get_family
from composer_shear.pruning.importance import collect_importance, random_importance
from composer_shear.shape import ModelShape, ShapeError
from tests.pruning_helpers import REPO, VENV_BIN
from tests.tiny_models import FAMILIES, prunable_dims, save_tiny_checkpoint, tiny_model

LAYER, NEURON, CHANNEL = 2, 5, 7


def batches(vocab: int, n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (2, 24), generator=generator) for _ in range(n)]


def shape_of(model) -> ModelShape:
    return get_family(model).shape(model.config)


@torch.no_grad()
def plant(model, kind: str) -> int:
    """Makes one unit of ``kind`` unimportant; returns the index it has in its row."""
    family = get_family(model)
    shape = shape_of(model)
    hd, n_rep = shape.head_dim, shape.heads_per_group
    layers = [family.layer_modules(layer) for layer in family.layer_list(model)]
    if kind == "layers":  # the block adds nothing to the residual stream: cos(in, out) = 1
        for proj in (layers[LAYER].o_proj, layers[LAYER].down_proj):
            proj.weight.zero_()
            if proj.bias is not None:
                proj.bias.zero_()
        return LAYER
    if kind == "intermediate":  # silu(0) * 0 = 0 in every layer
        for mods in layers:
            mods.gate_proj.weight[NEURON].zero_()
            mods.up_proj.weight[NEURON].zero_()
        return NEURON
    if kind == "hidden":  # every RMSNorm outputs 0 on this channel
        norms = [m for mods in layers for m in mods.hidden_norms]
        for norm in [*norms, family.final_norm_module(model)]:
            # Norms scale by (offset + weight): Gemma's by 1 + weight.
            norm.weight[CHANNEL] = -family.norm_weight_offset
        return CHANNEL
    if kind == "kv_heads":  # every query head of kv group 1 writes nothing through o_proj
        for mods in layers:
            mods.o_proj.weight[:, 1 * n_rep * hd : 2 * n_rep * hd] = 0.0
        return 1
    if kind == "heads":  # query head 1 of every group (MHA: head 1) writes nothing
        groups = 1 if shape.is_mha else shape.num_key_value_heads
        for mods in layers:
            for group in range(groups):
                head = group * n_rep + 1
                mods.o_proj.weight[:, head * hd : (head + 1) * hd] = 0.0
        return 1
    raise ValueError(kind)


def one_less(model, kind: str) -> dict[str, int]:
    shape = shape_of(model)
    if kind == "layers":
        return {"num_hidden_layers": shape.num_hidden_layers - 1}
    if kind == "intermediate":
        return {"intermediate_size": shape.intermediate_size - 1}
    if kind == "hidden":
        return {"hidden_size": shape.hidden_size - 1}
    if kind == "kv_heads":
        return {"num_key_value_heads": shape.num_key_value_heads - 1}
    # One query head less per kv group (MHA: one head less).
    per_group = shape.heads_per_group - 1 if not shape.is_mha else 1
    if shape.is_mha:
        return {"num_attention_heads": shape.num_attention_heads - 1}
    return {"num_attention_heads": per_group * shape.num_key_value_heads}


def kinds(family: str) -> list[str]:
    _, kwargs = FAMILIES[family]
    gqa = kwargs["num_attention_heads"] != kwargs["num_key_value_heads"] > 1
    layers = ["layers"] if "num_hidden_layers" in prunable_dims(family) else []
    return [*layers, "intermediate", "hidden", "heads", *(["kv_heads"] if gqa else [])]


CASES = [(family, kind) for family in sorted(FAMILIES) for kind in kinds(family)]


@pytest.mark.parametrize("family, kind", CASES)
def test_planted_unit_is_removed(family, kind):
    model = tiny_model(family)
    index = plant(model, kind)
    importance = collect_importance(model, batches(model.config.vocab_size))
    plan = oneshot_plan(model, one_less(model, kind), importance)
    shape = shape_of(model)
    if kind == "layers":
        assert index not in plan.kept_layers
        assert len(plan.kept_layers) == shape.num_hidden_layers - 1
    elif kind == "intermediate":
        assert all(index not in row.tolist() for row in plan.kept_intermediate)
    elif kind == "hidden":
        assert index not in plan.kept_hidden.tolist()
    elif kind == "kv_heads":
        assert all(index not in row.tolist() for row in plan.kept_kv)
    else:  # heads: query head 1 of every group is gone, the others stay
        n_rep = shape.heads_per_group
        removed = {g * n_rep + 1 for g in range(shape.num_key_value_heads)}
        if shape.is_mha:
            removed = {1}
        for row in plan.kept_heads:
            assert not removed & set(row.tolist())
            assert len(row) == shape.num_attention_heads - len(removed)
    # Nothing else is dropped: every scale is 1 (one-shot folds no gate values).
    assert torch.all(plan.head_scale == 1) and torch.all(plan.intermediate_scale == 1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_oneshot_export_loads_at_target(family, tied, tmp_path):
    model = tiny_model(family, tie_word_embeddings=tied)
    shape = shape_of(model)
    target = {
        "num_hidden_layers": 3,
        "intermediate_size": 64,
        "hidden_size": 48,
        "num_key_value_heads": max(1, shape.num_key_value_heads // 2),
    }
    if shape.is_mha:
        target["num_attention_heads"] = target["num_key_value_heads"]
    if shape.num_key_value_heads == 1:  # multi-query: query heads are what can go
        target["num_attention_heads"] = shape.num_attention_heads // 2
    if "num_hidden_layers" not in prunable_dims(family):
        del target["num_hidden_layers"]
    compact = prune_oneshot(model, target, batches(model.config.vocab_size))
    expected = shape.resolve_target(target)
    compact.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    for key, value in expected.config_updates().items():
        assert getattr(loaded.config, key) == value, key
    assert sum(p.numel() for p in loaded.parameters()) == expected.num_params()
    ids = batches(model.config.vocab_size, 1, seed=3)[0]
    with torch.no_grad():
        assert torch.allclose(compact(ids).logits, loaded.eval()(ids).logits, atol=1e-5)


def every_dim_target(family: str, shape: ModelShape) -> dict[str, int]:
    """A target that shrinks every dimension the family can prune, query heads in groups too."""
    kv = max(1, shape.num_key_value_heads // 2)
    if shape.is_mha:
        heads = kv
    elif shape.num_key_value_heads == 1:
        heads = shape.num_attention_heads // 2
    else:
        heads = kv * max(1, shape.heads_per_group // 2)
    target = {
        "num_hidden_layers": shape.num_hidden_layers - 1,
        "intermediate_size": shape.intermediate_size // 2,
        "hidden_size": shape.hidden_size - 16,
        "num_key_value_heads": kv,
        "num_attention_heads": heads,
    }
    return {k: v for k, v in target.items() if k in prunable_dims(family)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_units_plan_keeps_exactly_the_recorded_units(family):
    model = tiny_model(family)
    shape = shape_of(model)
    # A random choice: nothing about it is "the first units", so every index must come from
    # the record.
    plan = oneshot_plan(model, every_dim_target(family, shape), random_importance(shape, 5))
    record = kept_units_record(plan, shape)
    again = units_plan(model, record)
    assert again.kept_units() == plan.kept_units() and again.target == plan.target
    a, b = prune_model(model, plan=plan), prune_model(model, plan=again)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_units_plan_rejects_another_source_and_bad_records():
    model = tiny_model("llama_gqa")
    shape = shape_of(model)
    record = kept_units_record(
        oneshot_plan(model, {"intermediate_size": 64}, random_importance(shape, 1)), shape
    )
    with pytest.raises(ShapeError, match="source of shape"):
        units_plan(tiny_model("llama_gqa", intermediate_size=160), record)
    repeated = json.loads(json.dumps(record))
    repeated["kept"]["intermediate"][0][1] = repeated["kept"]["intermediate"][0][0]
    with pytest.raises(ShapeError, match="repeats a unit"):
        units_plan(model, repeated)
    outside = json.loads(json.dumps(record))
    outside["kept"]["intermediate"][0][-1] = shape.intermediate_size
    with pytest.raises(ShapeError, match="outside"):
        units_plan(model, outside)
    stray = kept_units_record(
        oneshot_plan(model, {"num_key_value_heads": 1}, random_importance(shape, 1)), shape
    )
    n_rep = shape.heads_per_group
    dropped = next(
        g for g in range(shape.num_key_value_heads) if g not in stray["kept"]["kv_heads"][0]
    )
    stray["kept"]["heads"][0][0] = dropped * n_rep  # a query head of a dropped kv group
    with pytest.raises(ShapeError, match="not one model's choice"):
        units_plan(model, stray)
    layer_out = json.loads(json.dumps(record))
    layer_out["kept"]["layers"][-1] = shape.num_hidden_layers
    with pytest.raises(ShapeError, match="outside"):
        units_plan(model, layer_out)
    ragged = json.loads(json.dumps(record))
    ragged["kept"]["intermediate"][1] = ragged["kept"]["intermediate"][1][:-1]
    with pytest.raises(ShapeError, match="same length"):
        units_plan(model, ragged)


def test_random_method_differs_by_seed_and_needs_no_data():
    model = tiny_model("llama_gqa")
    a = prune_oneshot(model, {"intermediate_size": 48}, method="random", seed=0)
    b = prune_oneshot(model, {"intermediate_size": 48}, method="random", seed=1)
    assert a.config.intermediate_size == b.config.intermediate_size == 48
    wa, wb = (m.model.layers[0].mlp.up_proj.weight for m in (a, b))
    assert not torch.equal(wa, wb)
    with pytest.raises(ValueError, match="calibration batches"):
        prune_oneshot(model, {"intermediate_size": 48})


def test_parse_target_shape():
    assert parse_target_shape("num_hidden_layers=24, hidden_size=512") == {
        "num_hidden_layers": 24,
        "hidden_size": 512,
    }
    assert parse_target_shape('{"hidden_size": 512}') == {"hidden_size": 512}
    for bad in ("hidden=512", "hidden_size=big", "hidden_size", ""):
        with pytest.raises(ShapeError):
            parse_target_shape(bad)


@pytest.mark.slow
def test_cli_prunes_smollm2_at_target(smollm2_dir, tmp_path):
    from composer_shear.data.prep import prepare_domains

    data = tmp_path / "data"
    prepare_domains(
        REPO / "data" / "sample_corpus",
        data,
        str(smollm2_dir),
        64,
        domains=["code", "books"],
        verbose=False,
    )
    out = tmp_path / "oneshot"
    target = "num_hidden_layers=24,hidden_size=512,num_attention_heads=6,num_key_value_heads=2"
    cmd = [
        str(VENV_BIN / "composer-shear"), "prune-oneshot", str(smollm2_dir), str(out),
        "--data", str(data), "--max-seq-len", "64", "--calibration-tokens", "2048",
        "--target-shape", f"{target},intermediate_size=1152",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert loaded.config.num_hidden_layers == 24 and loaded.config.hidden_size == 512
    assert sum(p.numel() for p in loaded.parameters()) == 80_241_152
    kept = read_kept_units(out)["kept"]
    assert len(kept["layers"]) == 24 and kept["layers"] == sorted(set(kept["layers"]))
    assert set(kept["layers"]) <= set(range(30)) and len(kept["hidden"]) == 512
    assert all(len(row) == 1152 and row == sorted(set(row)) for row in kept["intermediate"])
    assert all(len(row) == 6 for row in kept["heads"])
    # Another run's units, cut from the unpruned weights: the same model, no calibration.
    again = tmp_path / "again"
    units = subprocess.run(
        [*cmd[:3], str(again), "--units", str(out)],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert units.returncode == 0, units.stderr[-3000:]
    assert read_kept_units(again)["kept"] == kept
    reloaded = AutoModelForCausalLM.from_pretrained(again)
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), reloaded.state_dict().values(), strict=True)
    )
    mismatch = subprocess.run(
        [*cmd[:3], str(tmp_path / "mismatch"), "--units", str(out), "--target-shape",
         "hidden_size=448"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert mismatch.returncode == 1 and "differs from the shape" in mismatch.stderr
    assert not (tmp_path / "mismatch").exists()
    # Bad input: a clear error, nothing written.
    bad = subprocess.run(
        [*cmd[:3], str(tmp_path / "bad"), *cmd[4:-2], "--target-shape", "hidden_size=4096"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )  # fmt: skip
    assert bad.returncode == 1 and "larger than the source" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.fixture
def corrupt_weights_dir(tiny_tokenizer_dir, tmp_path):
    """A tiny model directory whose config is fine and whose weights file is garbage."""
    out = save_tiny_checkpoint(tiny_model("llama_gqa"), tiny_tokenizer_dir, tmp_path / "model")
    (out / "model.safetensors").write_bytes(b"not a safetensors file" * 64)
    return out


def test_target_is_checked_before_any_weight_loads(corrupt_weights_dir, tmp_path, capsys):
    source = corrupt_weights_dir
    with pytest.raises(ShapeError, match="larger than the source"):
        prune_oneshot_to_dir(source, tmp_path / "a", {"hidden_size": 4096}, method="random")
    with pytest.raises(ShapeError, match="no shape of this source fits"):
        prune_oneshot_to_dir(source, tmp_path / "b", target_params=1000, data=tmp_path)
    # The command line says the same (exit 1, the target's message, nothing written).
    code = main(["prune-oneshot", str(source), str(tmp_path / "c"), "--method", "random",
                 "--target-shape", "hidden_size=4096"])  # fmt: skip
    assert code == 1 and "larger than the source" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")
    # Not vacuous: a valid target does reach the weights, and they are what fails.
    with pytest.raises(Exception, match=r"(?i)safetensors|header|deserializ") as error:
        prune_oneshot_to_dir(source, tmp_path / "d", {"intermediate_size": 48}, method="random")
    assert not isinstance(error.value, ShapeError)


def test_dtype_and_device_options(tiny_tokenizer_dir, tmp_path, capsys):
    source = save_tiny_checkpoint(tiny_model("llama_gqa"), tiny_tokenizer_dir, tmp_path / "src")
    target = {"intermediate_size": 48, "num_hidden_layers": 3}
    full = prune_oneshot_to_dir(source, tmp_path / "fp32", target, method="random", seed=4)
    half = prune_oneshot_to_dir(
        source, tmp_path / "bf16", target, method="random", seed=4, device="cpu", dtype="bfloat16"
    )
    assert read_kept_units(half.out_dir)["kept"] == read_kept_units(full.out_dir)["kept"]
    assert json.loads((half.out_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    a, b = (
        load_file(full.out_dir / "model.safetensors"),
        load_file(half.out_dir / "model.safetensors"),
    )
    assert sorted(a) == sorted(b)
    for name, value in b.items():  # the source's weights in bfloat16, cut at the same units
        assert value.dtype == torch.bfloat16 and torch.equal(value, a[name].to(torch.bfloat16))
    with pytest.raises(SystemExit) as usage:
        main(["prune-oneshot", str(source), str(tmp_path / "x"), "--method", "random",
              "--target-shape", "intermediate_size=48", "--device", "gpu0"])  # fmt: skip
    assert usage.value.code == 2 and "not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        code = main(["prune-oneshot", str(source), str(tmp_path / "y"), "--method", "random",
                     "--target-shape", "intermediate_size=48", "--device", "cuda"])  # fmt: skip
        assert code == 1 and "CUDA is not available" in capsys.readouterr().err
