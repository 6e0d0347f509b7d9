"""The streamed export: byte for byte what the in-memory path writes, in bounded memory.

The export cuts one tensor at a time from the checkpoint (memory-mapped, or read on demand
from DCP shards) into the safetensors files; these tests hold it to the files
``prune_model`` + ``save_pretrained`` write, for every family, tied or not, sharded or not.
"""

from __future__ import annotations

import filecmp
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from composer_shear.export.checkpoint import (
    checkpoint_tensors,
    export_checkpoint,
    load_composer_checkpoint,
)
from composer_shear.export.surgery import prune_model
from composer_shear.export.writer import write_hf_directory
from composer_shear.pruning.masking import attach_gates
from tests.pruning_helpers import FAMILY_TARGETS
from tests.tiny_models import tiny_model

WEIGHT_FILES = re.compile(r"(config\.json|generation_config\.json|model.*\.safetensors.*)")


def _same_files(a: Path, b: Path) -> list[str]:
    """The weight and config files of two HF folders; asserts they are byte-identical."""
    names = sorted(n for n in os.listdir(a) if WEIGHT_FILES.fullmatch(n))
    assert names == sorted(n for n in os.listdir(b) if WEIGHT_FILES.fullmatch(n))
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name
    return names


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard", ["2GB", 30_000])
def test_writer_writes_what_save_pretrained_writes(tmp_path, tied, shard):
    model = tiny_model("llama_gqa", tie_word_embeddings=tied)
    # Mixed dtypes: the file order (wider dtypes first, then by name) and the header matter.
    model.to(torch.bfloat16)
    model.model.norm.to(torch.float32)
    write_hf_directory(model, tmp_path / "streamed", max_shard_size=shard)
    model.save_pretrained(tmp_path / "reference", safe_serialization=True, max_shard_size=shard)
    names = _same_files(tmp_path / "streamed", tmp_path / "reference")
    assert ("model.safetensors.index.json" in names) == (shard != "2GB")


def _composer_checkpoint(family: str, tied: bool, path: Path) -> torch.nn.Module:
    """A Composer-style targeted_pruning checkpoint of a tiny gated model with AdamW state."""
    model = tiny_model(family, tie_word_embeddings=tied, seed=3)
    target = FAMILY_TARGETS[family]
    gates = attach_gates(model, target, seed=0)
    with torch.no_grad():  # gate values that are not all alike: folding shows up
        for gate in gates.gates.values():
            gate.log_alpha.normal_(0.0, 3.0, generator=torch.Generator().manual_seed(1))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    moments = {
        n: {"exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
        for n, p in model.named_parameters()
    }
    config = model.config.to_dict()
    torch.save(
        {
            "state": {
                "model": state,
                "optimizers": {"DecoupledAdamW": {"state": moments, "param_groups": []}},
                "algorithms": [("TargetedPruning", {"target_shape": target, "seed": 0})],
                "integrations": {
                    "huggingface": {
                        "model": {
                            "config": {"content": config, "class": type(model.config).__name__}
                        }
                    }
                },
            },
            "rng": [],
        },
        path,
    )
    return model


@pytest.mark.parametrize("family", sorted(FAMILY_TARGETS))
def test_checkpoint_export_is_byte_identical_to_the_in_memory_path(
    tmp_path, tiny_tokenizer_dir, family
):
    ckpt = tmp_path / "ckpt.pt"
    model = _composer_checkpoint(family, tied=family == "llama_gqa", path=ckpt)
    for dtype in ("auto", "bfloat16"):
        out = tmp_path / f"streamed_{dtype}"
        export_checkpoint(ckpt, out, tokenizer_path=tiny_tokenizer_dir, dtype=dtype)
        compact = prune_model(model)
        if dtype == "bfloat16":
            compact = compact.to(torch.bfloat16)
        compact.save_pretrained(tmp_path / f"reference_{dtype}", safe_serialization=True)
        _same_files(out, tmp_path / f"reference_{dtype}")
    assert (
        load_file(tmp_path / "streamed_bfloat16" / "model.safetensors")[
            "model.embed_tokens.weight"
        ].dtype
        == torch.bfloat16
    )


def _rss_file() -> int:
    """File-backed resident memory of this process (RssFile), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_read_checkpoint_tensor_leaves_the_resident_set(tmp_path):
    """A source tensor read through the mapped file stops counting once it has been cut."""
    ckpt = tmp_path / "ckpt.pt"
    big = torch.randn(64, 1024, 1024)  # 256 MiB
    torch.save({"state": {"model": {"model.big": big, "model.shear_gates.g": torch.ones(3)}}}, ckpt)
    expected = big.sum()
    del big
    checkpoint = load_composer_checkpoint(ckpt)
    read = checkpoint_tensors(checkpoint)
    before = _rss_file()
    with read("big") as tensor:
        assert torch.equal(tensor.sum(), expected)  # every page read
        inside = _rss_file()
    after = _rss_file()
    assert inside - before > 200 * 2**20
    assert after - before < 16 * 2**20
    with read("big") as tensor:  # released pages come back from the file, intact
        assert torch.equal(tensor.sum(), expected)
