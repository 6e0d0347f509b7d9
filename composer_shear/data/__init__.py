"""Per-domain tokenized shards, the live domain mixer and the ``multi_domain`` dataloader."""

from composer_shear.data.mixer import MultiDomainDataset, find_multi_domain_dataset
from composer_shear.data.prep import DataPrepError, prepare_domains

__all__ = [
    "DataPrepError",
    "MultiDomainDataset",
    "build_multi_domain_dataloader",
    "find_multi_domain_dataset",
    "prepare_domains",
]


def __getattr__(name: str):
    # The builder imports Composer and LLM Foundry; load it only when asked for.
    if name == "build_multi_domain_dataloader":
        from composer_shear.data.builder import build_multi_domain_dataloader

        return build_multi_domain_dataloader
    raise AttributeError(name)
