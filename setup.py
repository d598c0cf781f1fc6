"""fastdpo: a fast, kernel-accelerated DPO trainer for small GPT-style models."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
WEB = ["fastapi>=0.110", "uvicorn>=0.29"]
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "dpo" / "__init__.py").read_text()).group(1)

setup(
    name="fastdpo",
    version=VERSION,
    description="Fast, kernel-accelerated Direct Preference Optimization for GPT-2 and Llama-family models",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # One top-level import name: the repository's folders install as parts of ``fastdpo``.
    package_dir={"fastdpo": "dpo", "fastdpo.kernels": "kernels", "fastdpo.bench": "bench",
                 "fastdpo.configs": "configs"},
    packages=["fastdpo", *(f"fastdpo.{p}" for p in find_packages("dpo")),
              "fastdpo.kernels", "fastdpo.bench", "fastdpo.configs"],
    package_data={"fastdpo.configs": ["*.yaml", "*.txt"], "fastdpo.generation.label": ["*.html"]},
    install_requires=[
        # A range the CPU wheel 2.13.0 satisfies: install it first (see README) so pip
        # does not fetch a multi-GB CUDA build on machines without a GPU.
        "torch>=2.13",
        "triton>=3.2; platform_system == 'Linux'",
        "tokenizers>=0.19",
        "jinja2>=3.1.6",   # Hugging Face chat templates (sandboxed; older versions have known escapes)
        "safetensors>=0.4",
        "pyyaml>=6",
        "pydantic>=2",   # config schemas (fastdpo.models.schema)
        "openai>=1.30",
        "wandb>=0.17",
        "tqdm>=4.66",
        "numpy>=1.26",
        "matplotlib>=3.8",
    ],
    extras_require={
        # fastdpo serve and fastdpo label (the same web stack under the name each is known by)
        "serve": WEB,
        "ui": WEB,
        "tensorboard": ["tensorboard>=2.14"],
        # trl and peft: the tests compare fastdpo's losses with TRL's code and load fastdpo's LoRA
        # adapters with peft onto the equivalent transformers model (both keep the CPU torch build);
        # the web stack and Playwright: the tests drive the server with the openai client and the
        # labeling page through the system's Chromium (Debian's `chromium`; that test skips without it);
        # transformers: also what the Hugging Face import/export tests compare against;
        # tensorboard: the tests read the event files back
        "dev": ["pytest>=8", "pytest-benchmark>=4", "ruff>=0.5", "transformers>=4.51", "trl", "peft", *WEB,
                "playwright>=1.40", "tensorboard>=2.14"],
        # transformers is not needed to import, train or export Hugging Face models; it is what
        # reads the exported directories (4.51: the first with Qwen3)
        "hf": ["transformers>=4.51"],
        "judge": ["vllm"],
        # --sampler vllm: the policy's answers from vllm.LLM in the same process (CUDA only)
        "vllm": ["vllm"],
        "peers": ["transformers", "trl", "liger-kernel"],
    },
    entry_points={
        "console_scripts": ["fastdpo = fastdpo.cli:main"],
        # judges selectable by name (--judge NAME); other packages may add their own
        "fastdpo.judges": ["task = fastdpo.demo.task:make_judge"],
    },
)
