"""Packaging for logitfuse.

One distribution, four folders. ``kernels/``, ``train_fuser/`` and ``benchmarks/`` live at the top of the
repository but install as ``logitfuse.kernels``, ``logitfuse.train_fuser`` and ``logitfuse.bench``: listing the packages
explicitly (instead of ``find_packages()``) keeps a top-level ``kernels`` package out of the wheel,
where it would collide with the unrelated ``kernels`` distribution on PyPI.
"""

from setuptools import setup

setup(
    name="logitfuse",
    version="0.1.0",
    description="Decoding-time logit fusion between a cloud LLM and a private on-device SLM (CoGenesis)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "logitfuse", "logitfuse.vocab", "logitfuse.heads", "logitfuse.rules", "logitfuse.decoding", "logitfuse.backends", "logitfuse.zoo",
        "logitfuse.evaluation", "logitfuse.serve", "logitfuse.cli", "logitfuse.testing",
        "logitfuse.kernels", "logitfuse.train_fuser", "logitfuse.bench",
    ],
    package_dir={
        "logitfuse": "logitfuse",
        "logitfuse.kernels": "kernels",
        "logitfuse.train_fuser": "train_fuser",
        "logitfuse.bench": "benchmarks",
    },
    package_data={"logitfuse.train_fuser": ["data/*.json", "data/*.md", "heads/*/*/*", "adapters/*/*"]},
    install_requires=[
        # torch is deliberately unpinned here; install a wheel that fits your machine first
        # (CI and the README install torch==2.13.0, a CPU build, before this package).
        "torch>=2.4",
        "transformers>=4.46,<6",  # logitfuse.decoding.guard.REQUIREMENT (tests/decoding/test_guard.py)
        "safetensors>=0.4",
        "numpy>=1.24",
        "tqdm>=4.60",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "numpy>=1.24", "tokenizers>=0.19", "peft>=0.13", "ruff>=0.6"],
        "models": ["gguf>=0.10", "accelerate>=0.30"],
        "finetune": ["peft>=0.13"],  # LoRA: logitfuse finetune, --adapter, tuned zoo entries (tested with 0.21.2)
        "bench": ["matplotlib>=3.7"],
        "engine": ["llama-cpp-python[server]==0.3.36"],
        "judge": ["rouge-score>=0.1.2"],  # logitfuse judge: ROUGE-L against the reference responses
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],  # mkdocs build --strict
    },
    entry_points={"console_scripts": ["logitfuse=logitfuse.cli:main"]},
)
