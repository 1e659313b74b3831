"""mod_megatron: Mixture-of-Depths (MoD) and MoDE pretraining on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="mod_megatron",
    version="0.1.0",
    description="Mixture-of-Depths / MoDE language-model pretraining on megatron-core",
    packages=find_packages(include=["mod_megatron", "mod_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by the Makefile / .ci for CPU (torch==2.13.0); any >=2.4 works on GPU.
        "torch>=2.4",
        # megatron-core releases after 0.16.1 need Python >= 3.12; 0.16.1 runs on 3.10-3.12.
        "megatron-core==0.16.1",
        "deepspeed>=0.15",
        "sentencepiece>=0.2",
        "tensorboard>=2.14",
        "pyyaml>=6",
        "tqdm>=4.60",
        "psutil>=5.9",  # megatron dist-checkpoint saves hang without it
        "numpy>=1.24",
    ],
    # transformers/safetensors: only mod-convert to-hf / from-hf and their tests (imported lazily).
    # 4.57.x is the line tested here (Python 3.11, torch 2.13).
    extras_require={"test": ["pytest>=7", "transformers>=4.57,<4.58", "safetensors>=0.4.3"]},
    entry_points={
        "console_scripts": [
            "mod-train=mod_megatron.training.cli:main",
            "mod-preprocess=mod_megatron.data.preprocess:main",
            "mod-convert=mod_megatron.convert.cli:main",
            "mod-eval=mod_megatron.inference.evaluate:main",
            "mod-generate=mod_megatron.inference.generate:main",
        ]
    },
)
