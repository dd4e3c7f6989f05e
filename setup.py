"""eaft-megatron: Entropy-Adaptive Fine-Tuning (EAFT) for Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="eaft-megatron",
    version="0.1.0",
    description="Entropy-Adaptive Fine-Tuning (EAFT) for Megatron-Core: vocab-parallel loss, "
    "HF <-> Megatron conversion, SFT data preparation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["eaft_megatron", "eaft_megatron.*"]),
    package_data={"eaft_megatron.demo": ["chat.jsonl"]},
    python_requires=">=3.12",
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.19",  # tested with 0.19.2
        "numpy",
        "packaging",
        "psutil",  # megatron's checkpoint saving fails (0.19) or hangs (0.16) without it
        "tqdm",
        "safetensors",
        "transformers>=4.51",  # Qwen3 / Glm4 configs and tokenizers (local files only)
        "tokenizers",
        "sentencepiece",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist", "hypothesis", "matplotlib",
                 "tensorboard", "ruff"],
        # Optional GPU accelerations. NVIDIA apex is built from source by users
        # (https://github.com/NVIDIA/apex); the PyPI package named "apex" is unrelated.
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["eaft-megatron=eaft_megatron.cli:main"]},
)
