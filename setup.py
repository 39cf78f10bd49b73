"""fedsmooth_hf: federated LoRA fine-tuning (FedSmoothLoRA and baselines) for HuggingFace Trainer."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
version = {}
exec((HERE / "fedsmooth_hf" / "version.py").read_text(), version)

setup(
    name="fedsmooth_hf",
    version=version["__version__"],
    description="Federated LoRA fine-tuning for transformers.Trainer: FedSmoothLoRA and its baselines",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["fedsmooth_hf", "fedsmooth_hf.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "peft>=0.17",
        "accelerate>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.15"],
        "qlora": ["bitsandbytes>=0.45"],
        # 1.42: one HTTP port per SuperLink/SuperNode, connections in $FLWR_HOME/config.toml (docs/flower.md);
        # cryptography: TLS certificates and SuperNode keys
        "flower": ["flwr[simulation]>=1.42", "cryptography"],
        # client-level DP: the accountant (docs/privacy.md)
        "privacy": ["dp-accounting>=0.4"],
        "recipes": ["gguf>=0.10", "matplotlib", "scikit-learn", "sentencepiece"],
        # import-linter: the layer contracts of pyproject.toml, checked by `make test`;
        # opacus: a second accountant the DP tests cross-check dp-accounting against
        "dev": ["pytest>=8", "hypothesis>=6", "ruff>=0.5", "import-linter>=2.1", "matplotlib", "scikit-learn",
                "gguf>=0.10", "flwr[simulation]>=1.42", "cryptography", "dp-accounting>=0.4", "opacus>=1.5"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
