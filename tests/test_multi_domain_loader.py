"""The ``multi_domain`` LLM Foundry dataloader: registration, batch format, config errors, and
short real ``llmfoundry`` training runs (with per-domain eval and checkpoint resumption)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from composer.core import Callback, DataSpec
from transformers import AutoTokenizer

from composer_shear.data.builder import build_multi_domain_dataloader
from composer_shear.data.mixer import MultiDomainDataset, find_multi_domain_dataset
from tests.mds_helpers import synthetic_domains, write_domain_shards

DOMAINS = ["code", "books", "docs"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_tokenizer_dir):
    out = tmp_path_factory.mktemp("loader") / "mds"
    return write_domain_shards(out, tiny_tokenizer_dir, synthetic_domains(tuple(DOMAINS)), 16)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def dataset_cfg(shards, **overrides):
    cfg = dict(
        local=str(shards),
        remote=None,
        split="train",
        domains=list(DOMAINS),
        proportion=[0.5, 0.3, 0.2],
        max_seq_len=16,
        shuffle=True,
        shuffle_seed=17,
    )
    cfg.update(overrides)
    return cfg


def test_registered_in_llmfoundry_and_batch_format(shards, tok):
    from llmfoundry.data.dataloader import build_dataloader

    cfg = {
        "name": "multi_domain",
        "dataset": dataset_cfg(shards, max_seq_len=12),
        "drop_last": True,
        "num_workers": 0,
        "prefetch_factor": None,
        "persistent_workers": False,
    }
    spec = build_dataloader(cfg, tok, 4)
    assert isinstance(spec, DataSpec)
    ds = find_multi_domain_dataset(spec)
    assert isinstance(ds, MultiDomainDataset) and spec.dataloader.dataset is ds
    batch = next(iter(spec.dataloader))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "domain_idx"}
    assert batch["input_ids"].shape == (4, 12) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["attention_mask"].sum() == 48
    assert batch["domain_idx"].dtype == torch.long and batch["domain_idx"].shape == (4,)
    assert batch["domain_idx"].tolist() == [int(i) for i in batch["domain_idx"]]
    assert ds.domain_counts.sum() == 4
    tokens = spec.get_num_tokens_in_batch(batch)
    assert (tokens["total"] if isinstance(tokens, dict) else tokens) == 48
    assert spec.get_num_samples_in_batch(batch) == 4


def test_eval_split_single_pass(shards, tok):
    cfg = dataset_cfg(shards, split="eval", domains=["docs"], shuffle=False)
    cfg.pop("proportion")
    spec = build_multi_domain_dataloader(tok, 8, cfg, drop_last=False)
    batches = list(spec.dataloader)
    n = json.loads((shards / "docs" / "eval" / "tokens_meta.json").read_text())["samples"]
    assert sum(len(b["input_ids"]) for b in batches) == n
    assert len(spec.dataloader) == len(batches)
    assert all((b["domain_idx"] == 0).all() for b in batches)
    assert len(list(spec.dataloader)) == len(batches)  # every evaluation is a full pass


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"proportion": [0.5, 0.3, 0.3]}, "sum to 1"),
        ({"proportion": [0.7, 0.5, -0.2]}, "non-negative"),
        ({"proportion": [0.5, 0.5]}, "2 entries but there are 3 domains"),
        ({"domains": ["code", "books", "poetry"]}, "no MDS shards"),
        ({"bogus_key": 1}, "unknown dataset key"),
        ({"max_seq_len": 17}, "longer than the 16-token samples"),
        ({"domains": "code"}, "non-empty list"),
        ({"domains": ["code", "code", "docs"]}, "duplicate"),
        ({"local": None}, "needs"),
    ],
)
def test_config_errors(shards, tok, overrides, match):
    with pytest.raises(ValueError, match=match):
        build_multi_domain_dataloader(tok, 4, dataset_cfg(shards, **overrides))


def test_unknown_loader_key_and_dtype_too_small(shards, tok):
    with pytest.raises(ValueError, match="unknown loader key"):
        build_multi_domain_dataloader(tok, 4, dataset_cfg(shards), shuffle=True)

    class BigVocab:
        def __len__(self):
            return 100_000

    with pytest.raises(ValueError, match="uint16, too small for the tokenizer's 100,000 tokens"):
        build_multi_domain_dataloader(BigVocab(), 4, dataset_cfg(shards))

    class SmallVocab:
        def __len__(self):
            return 100

    with pytest.raises(ValueError, match="re-tokenize"):
        build_multi_domain_dataloader(SmallVocab(), 4, dataset_cfg(shards))


def test_state_dict_through_composer_state(shards, tok):
    """Composer finds the dataset on the DataSpec and passes the global sample count."""
    from composer.core import State

    spec = build_multi_domain_dataloader(tok, 4, dataset_cfg(shards))
    it = iter(spec.dataloader)
    for _ in range(3):
        next(it)
    state = State(model=torch.nn.Linear(1, 1), rank_zero_seed=0, run_name="t", device="cpu")
    state.train_dataloader = spec.dataloader
    state.timestamp = state.timestamp.to_next_batch(samples=8, tokens=128)
    saved = state._dataset_state_dict()["train"]
    assert saved["position"] == 8  # rewound from 12 drawn to 8 trained on

    fresh = build_multi_domain_dataloader(tok, 4, dataset_cfg(shards))
    state2 = State(model=torch.nn.Linear(1, 1), rank_zero_seed=0, run_name="t", device="cpu")
    state2.train_dataloader = fresh.dataloader
    state2._load_dataset_state({"train": saved, "eval": {}})
    assert state2.dataset_resumption["train"]
    straight = build_multi_domain_dataloader(tok, 4, dataset_cfg(shards))
    s_it = iter(straight.dataloader)
    ref = [next(s_it) for _ in range(4)][2:]
    f_it = iter(fresh.dataloader)
    got = [next(f_it) for _ in range(2)]
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["domain_idx"], b["domain_idx"])


# ----------------------------------------------------------------------------- real runs


class RecordBatches(Callback):
    """Records what each training batch held (registered into LLM Foundry for the test)."""

    seen: list[list[int]] = []

    def after_dataloader(self, state, logger):
        batch = state.batch
        RecordBatches.seen.append(
            [*batch["domain_idx"].tolist(), *batch["input_ids"].sum(dim=1).tolist()]
        )


def _yaml(tmp_path: Path, ckpt: Path, shards: Path, save_folder: Path, extra: str = "") -> Path:
    loader = (
        "  drop_last: {drop}\n  num_workers: 0\n  prefetch_factor: null\n"
        "  persistent_workers: false\n"
    )
    evals = "".join(
        f"- label: {d}\n  name: multi_domain\n  dataset:\n    local: {shards}\n"
        f"    split: eval\n    domains: [{d}]\n    max_seq_len: 16\n    shuffle: false\n"
        + loader.format(drop="false").replace("\n  ", "\n  ")
        for d in DOMAINS
    )
    text = f"""
max_seq_len: 16
seed: 3
precision: fp32
model:
  name: hf_causal_lm
  pretrained_model_name_or_path: {ckpt}
  pretrained: true
tokenizer:
  name: {ckpt}
  kwargs:
    model_max_length: 16
optimizer:
  name: decoupled_adamw
  lr: 1.0e-3
  betas: [0.9, 0.95]
  eps: 1.0e-8
  weight_decay: 0.0
scheduler:
  name: constant_with_warmup
  t_warmup: 0ba
train_loader:
  name: multi_domain
  dataset:
    local: {shards}
    remote: null
    split: train
    domains: [code, books, docs]
    proportion: [0.5, 0.3, 0.2]
    max_seq_len: 16
    shuffle: true
    shuffle_seed: 17
{loader.format(drop="true")}
eval_loaders:
{evals}
eval_interval: 2ba
eval_subset_num_batches: 2
max_duration: 4ba
global_train_batch_size: 4
device_train_microbatch_size: 4
device_eval_batch_size: 4
progress_bar: false
log_to_console: false
python_log_level: null
save_folder: {save_folder}
save_interval: 2ba
save_overwrite: true
callbacks:
  record_batches: {{}}
{extra}
"""
    path = tmp_path / f"run_{save_folder.name}.yaml"
    path.write_text(text)
    return path


def test_llmfoundry_train_with_multi_domain_and_resume(tmp_path, shards, tiny_tokenizer_dir):
    from llmfoundry import registry
    from llmfoundry.command_utils import train_from_yaml

    from tests.tiny_models import save_tiny_checkpoint, tiny_model

    if "record_batches" not in registry.callbacks:
        registry.callbacks.register("record_batches", func=RecordBatches)
    ckpt = save_tiny_checkpoint(tiny_model("llama_gqa"), tiny_tokenizer_dir, tmp_path / "ckpt")
    data = Path(shutil.copytree(shards, tmp_path / "mds"))

    RecordBatches.seen = []
    trainer = train_from_yaml(str(_yaml(tmp_path, ckpt, data, tmp_path / "straight")), [])
    straight = list(RecordBatches.seen)
    assert len(straight) == 4
    state = trainer.state
    assert int(state.timestamp.batch) == 4
    for d in DOMAINS:  # per-domain eval metrics from the eval_loaders list
        loss = state.eval_metrics[f"eval/{d}"]["LanguageCrossEntropy"].compute()
        assert torch.isfinite(loss)
    ds = find_multi_domain_dataset(state.train_dataloader)
    assert ds.domain_counts.sum() == 16
    final_state = ds.state_dict(16, True)
    trainer.close()

    # Resume from the 2-batch checkpoint: the last two batches must be the same ones.
    RecordBatches.seen = []
    load = tmp_path / "straight" / "ep0-ba2-rank0.pt"
    assert load.is_file(), sorted(p.name for p in (tmp_path / "straight").iterdir())
    resumed_yaml = _yaml(tmp_path, ckpt, data, tmp_path / "resumed", extra=f"load_path: {load}")
    trainer = train_from_yaml(str(resumed_yaml), [])
    assert RecordBatches.seen == straight[2:]
    resumed_ds = find_multi_domain_dataset(trainer.state.train_dataloader)
    assert resumed_ds.state_dict(16, True) == final_state
    np.testing.assert_array_equal(resumed_ds.domain_counts, ds.domain_counts)
    trainer.close()
