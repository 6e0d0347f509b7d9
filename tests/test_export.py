"""Export from real pruning checkpoints: CLI, callback, strictness, bad input, CPT."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from composer_shear.distillation.algorithm import KnowledgeDistillation
from composer_shear.export.checkpoint import (
    export_checkpoint,
    export_model,
    load_composer_checkpoint,
)
from composer_shear.export.surgery import plan_pruning
from composer_shear.export.units import KeptUnitsError, compare_kept_units, read_kept_units
from composer_shear.export.writer import ExportError
from composer_shear.pruning.masking import find_gated_hf_model
from tests.pruning_helpers import (
    FAMILY_TARGETS,
    REPO,
    VENV_BIN,
    gates_of,
    make_tiny_run_inputs,
    run_prune,
    target_overrides,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, tiny_tokenizer_dir):
    """One tiny GQA pruning run (tied embeddings) with a checkpoint and a callback export."""
    root = tmp_path_factory.mktemp("pruned_run")
    model_dir, data_dir = make_tiny_run_inputs(root, tiny_tokenizer_dir, "llama_gqa", tied=True)
    trainer = run_prune(
        model_dir,
        data_dir,
        "max_duration=30ba",
        f"save_folder={root / 'ckpt'}",
        "save_interval=30ba",
        "save_filename=ba{batch}.pt",
        f"callbacks.pruned_hf_export.save_folder={root / 'callback_export'}",
    )
    hf_model = trainer.state.model.model.eval()
    gates = gates_of(trainer)
    gates.eval_at = "target"  # export writes the target shape; training evaluated expected
    ids = torch.randint(3, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked_logits = hf_model(ids).logits
    trainer.close()
    return dict(
        root=root,
        data_dir=data_dir,
        ckpt=root / "ckpt" / "ba30.pt",
        ids=ids,
        masked_logits=masked_logits,
        target=gates.target,
        hf_model=hf_model,
        kept=plan_pruning(gates).kept_units(),
    )


def load_hf(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def test_cli_export_matches_masked_model(pruned_run, tmp_path):
    out = tmp_path / "export"
    proc = subprocess.run(
        [str(VENV_BIN / "composer-shear"), "export", str(pruned_run["ckpt"]), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "source :" in proc.stdout and "pruned :" in proc.stdout
    model = load_hf(out)
    target = pruned_run["target"]
    for key, value in target.config_updates().items():
        assert getattr(model.config, key) == value
    assert sum(p.numel() for p in model.parameters()) == target.num_params()
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    with torch.no_grad():
        logits = model(pruned_run["ids"]).logits
    assert (logits - pruned_run["masked_logits"]).abs().max().item() < 1e-4
    prompt = pruned_run["ids"][:1, :5]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(
            model.generate(prompt, **kwargs), pruned_run["hf_model"].generate(prompt, **kwargs)
        )


def test_callback_export_equals_cli_export(pruned_run, tmp_path):
    callback_model = load_hf(pruned_run["root"] / "callback_export")
    summary = export_checkpoint(pruned_run["ckpt"], tmp_path / "cli")
    cli_model = load_hf(summary.out_dir)
    for (name, a), (_, b) in zip(
        callback_model.state_dict().items(), cli_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_export_records_the_source_units_it_keeps(pruned_run, tmp_path):
    out = export_checkpoint(pruned_run["ckpt"], tmp_path / "export").out_dir
    record = read_kept_units(out)
    target, kept = pruned_run["target"], record["kept"]
    assert kept == pruned_run["kept"]  # the plan of the trained gates
    assert len(kept["layers"]) == target.num_hidden_layers
    assert len(kept["hidden"]) == target.hidden_size
    assert all(len(row) == target.intermediate_size for row in kept["intermediate"])
    assert all(len(row) == target.num_key_value_heads for row in kept["kv_heads"])
    # The indices name the weights that were kept: gate_proj carries no folded gate value.
    model, source = load_hf(out), pruned_run["hf_model"]
    for i, layer in enumerate(kept["layers"]):
        weight = source.model.layers[layer].mlp.gate_proj.weight
        sliced = weight[kept["intermediate"][i]][:, kept["hidden"]]
        assert torch.equal(model.model.layers[i].mlp.gate_proj.weight, sliced), layer
    # Compared with itself and with the callback's export of the same run: all shared.
    same = compare_kept_units(record, read_kept_units(pruned_run["root"] / "callback_export"))
    assert all(row["shared"] == 1.0 and row["chance"] <= 1.0 for row in same.values())
    proc = subprocess.run(
        [str(VENV_BIN / "composer-shear"), "compare-units", str(out), str(out),
         "--json", str(tmp_path / "overlap.json")],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "intermediate" in proc.stdout and (tmp_path / "overlap.json").exists()
    missing = subprocess.run(
        [str(VENV_BIN / "composer-shear"), "compare-units", str(out), str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert missing.returncode == 1 and "composer_shear_kept_units.json" in missing.stderr


def test_compare_kept_units_counts_and_chance():
    shape = {
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "intermediate_size": 8, "hidden_size": 16,
    }  # fmt: skip
    a = {"source_shape": shape, "kept": {
        "layers": [0, 1, 3], "heads": [[0, 1], [0, 2], [2, 3]], "kv_heads": [[0], [0], [1]],
        "intermediate": [[0, 1, 2, 3], [4, 5, 6, 7], [0, 2, 4, 6]], "hidden": list(range(8)),
    }}  # fmt: skip
    b = {"source_shape": shape, "kept": {
        "layers": [0, 2, 3], "heads": [[0, 1], [0, 1], [0, 1]], "kv_heads": [[0], [0], [0]],
        "intermediate": [[0, 1, 6, 7], [0, 1, 2, 3], [0, 2, 4, 6]], "hidden": list(range(4, 12)),
    }}  # fmt: skip
    result = compare_kept_units(a, b)
    assert result["layers"] == pytest.approx(
        {"kept_a": 3, "kept_b": 3, "both": 2, "shared": 2 / 3, "chance": 3 / 4}
    )
    # Per-layer dimensions: only layers 0 and 3, kept by both.
    assert result["intermediate"]["both"] == 2 + 4 and result["intermediate"]["kept_a"] == 8
    assert result["intermediate"]["chance"] == pytest.approx(0.5)
    assert result["heads"]["both"] == 2 and result["kv_heads"]["shared"] == 0.5
    assert result["hidden"]["shared"] == 0.5 and result["hidden"]["chance"] == 0.5
    with pytest.raises(KeptUnitsError, match="different source shapes"):
        compare_kept_units(a, {**b, "source_shape": {**shape, "hidden_size": 32}})


def test_checkpoint_folder_is_accepted(pruned_run, tmp_path):
    summary = export_checkpoint(pruned_run["ckpt"].parent, tmp_path / "from_folder")
    assert summary.target == pruned_run["target"]


def _broken_checkpoint(pruned_run, tmp_path, mutate):
    checkpoint = load_composer_checkpoint(pruned_run["ckpt"])
    checkpoint.pop("_path")
    mutate(checkpoint)
    path = tmp_path / "broken.pt"
    torch.save(checkpoint, path)
    return path


def _drop_algorithms(ckpt):
    ckpt["state"]["algorithms"] = [
        a for a in ckpt["state"]["algorithms"] if a[0] != "TargetedPruning"
    ]


def _drop_tokenizer(ckpt):
    ckpt["state"]["integrations"]["huggingface"]["tokenizer"] = {}


def _wrong_weights(ckpt):
    model = ckpt["state"]["model"]
    key = next(k for k in model if k.endswith("layers.0.mlp.up_proj.weight"))
    model[key] = model[key][:, :-1]


def _missing_weight(ckpt):
    model = ckpt["state"]["model"]
    del model[next(k for k in model if k.endswith("layers.1.self_attn.k_proj.weight"))]


def test_checkpoints_name_no_module_of_ours(pruned_run):
    """Saved checkpoints survive moves of our modules: their pickles name none of them.

    Composer keeps algorithm and callback state as plain dicts keyed by class name; if one of
    our objects were pickled, a checkpoint written before a package move would stop loading.
    """
    with zipfile.ZipFile(pruned_run["ckpt"]) as archive:
        pickles = [archive.read(n) for n in archive.namelist() if n.endswith("data.pkl")]
    assert pickles
    assert not any(b"composer_shear" in data for data in pickles)
    assert any(b"TargetedPruning" in data for data in pickles)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_drop_algorithms, "no targeted_pruning state"),
        (_drop_tokenizer, "carries no tokenizer"),
        (_missing_weight, "does not match"),
        (_wrong_weights, "size mismatch|does not match"),
    ],
)
def test_bad_checkpoints_fail_cleanly(pruned_run, tmp_path, mutate, message):
    path = _broken_checkpoint(pruned_run, tmp_path, mutate)
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(VENV_BIN / "composer-shear"), "export", str(path), str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "error:" in proc.stderr
    import re

    assert re.search(message, proc.stderr), proc.stderr[-2000:]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_corrupted_file_and_missing_checkpoint(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x80\x04not a checkpoint at all" * 10)
    with pytest.raises(ExportError, match="Cannot read checkpoint"):
        export_checkpoint(bad, tmp_path / "out")
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "nope.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_directory_is_refused(pruned_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(pruned_run["ckpt"], out)
    # A folder we did not write is never replaced, even with overwrite.
    with pytest.raises(ExportError, match="not written by composer_shear"):
        export_checkpoint(pruned_run["ckpt"], out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # An earlier export is refused without overwrite and replaced with it.
    ours = tmp_path / "ours"
    export_checkpoint(pruned_run["ckpt"], ours)
    with pytest.raises(ExportError, match="not empty"):
        export_checkpoint(pruned_run["ckpt"], ours)
    export_checkpoint(pruned_run["ckpt"], ours, overwrite=True)
    assert (ours / "config.json").exists()


def test_continued_pretraining_from_export_with_plain_llmfoundry(pruned_run, tmp_path):
    from llmfoundry.command_utils import train_from_yaml

    export = export_checkpoint(pruned_run["ckpt"], tmp_path / "for_cpt").out_dir
    trainer = train_from_yaml(
        str(REPO / "yamls" / "tests" / "cpt_tiny.yaml"),
        [f"variables.model_dir={export}", f"variables.data_dir={pruned_run['data_dir']}"],
    )
    assert int(trainer.state.timestamp.batch) == 4
    model = trainer.state.model.model
    assert model.config.hidden_size == pruned_run["target"].hidden_size
    assert torch.isfinite(trainer.state.loss).all()
    shutil.rmtree(export)


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_new_families_end_to_end(family, tiny_tokenizer_dir, tmp_path):
    """Learned pruning from importance init with KD from the source, then the callback export
    and the CLI export: both equal the masked model at the target (tied embeddings)."""
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, family, tied=True)
    trainer = run_prune(
        model_dir,
        data_dir,
        "max_duration=6ba",
        "algorithms.targeted_pruning.init=activation",
        "algorithms.targeted_pruning.init_tokens=256",
        f"algorithms.targeted_pruning.init_data={data_dir}",
        "algorithms.knowledge_distillation.teacher=source",
        "algorithms.knowledge_distillation.alpha=0.5",
        f"save_folder={tmp_path / 'ckpt'}",
        "save_interval=6ba",
        "save_filename=last.pt",
        f"callbacks.pruned_hf_export.save_folder={tmp_path / 'callback_export'}",
        *target_overrides(FAMILY_TARGETS[family]),
    )
    gates = gates_of(trainer)
    gates.eval_at = "target"
    masked = trainer.state.model.model.eval()
    ids = torch.randint(3, 500, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        masked_logits = masked(ids).logits
    trainer.close()
    summary = export_checkpoint(tmp_path / "ckpt" / "last.pt", tmp_path / "cli")
    for path in (tmp_path / "callback_export", summary.out_dir):
        model = load_hf(path)
        assert type(model).__name__ == type(masked).__name__
        for key, value in FAMILY_TARGETS[family].items():
            assert getattr(model.config, key) == value, key
        assert sum(p.numel() for p in model.parameters()) == gates.target.num_params()
        with torch.no_grad():
            assert (model(ids).logits - masked_logits).abs().max().item() < 1e-4


def test_bf16_export_is_the_fp32_export_cast_beside_a_bf16_teacher(tiny_tokenizer_dir, tmp_path):
    """``precision: bfloat16`` writes, tensor for tensor, the fp32 export cast to bf16 (the
    cast follows the fold and the slice), in a run distilling from a bf16 teacher
    (``teacher_dtype: bfloat16``, what ``auto`` picks under ``amp_bf16``) as the GPU recipes do."""
    model_dir, data_dir = make_tiny_run_inputs(tmp_path, tiny_tokenizer_dir, "llama_gqa")
    trainer = run_prune(
        model_dir,
        data_dir,
        "max_duration=4ba",
        "algorithms.knowledge_distillation.teacher=source",
        "algorithms.knowledge_distillation.alpha=0.5",
        "algorithms.knowledge_distillation.teacher_dtype=bfloat16",
        f"callbacks.pruned_hf_export.save_folder={tmp_path / 'bf16'}",
        "callbacks.pruned_hf_export.precision=bfloat16",
    )
    (kd,) = [a for a in trainer.state.algorithms if isinstance(a, KnowledgeDistillation)]
    assert {p.dtype for p in kd.teacher.parameters()} == {torch.bfloat16}
    assert torch.isfinite(trainer.state.loss["kd"]) and trainer.state.loss["kd"] > 0
    hf_model = find_gated_hf_model(trainer.state.model)
    fp32 = export_model(hf_model, tmp_path / "fp32", trainer.state.model.tokenizer).out_dir
    trainer.close()
    bf16 = load_file(tmp_path / "bf16" / "model.safetensors")
    reference = load_file(fp32 / "model.safetensors")
    assert bf16.keys() == reference.keys()
    for name, tensor in reference.items():
        assert tensor.dtype == torch.float32, name
        assert bf16[name].dtype == torch.bfloat16, name
        assert torch.equal(bf16[name], tensor.to(torch.bfloat16)), name
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    model = load_hf(tmp_path / "bf16")  # loads strictly
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 48
