"""tspin: T-SPIN / SPIN / SFT self-play fine-tuning of Hugging Face causal LMs on the fused tspin_kernels loss."""

__version__ = "0.1.0"
