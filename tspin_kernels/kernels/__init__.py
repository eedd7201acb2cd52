"""Triton kernels and their launchers. No autograd here: see ``tspin_kernels.functions``."""
