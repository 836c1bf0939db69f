"""Triton kernels (imported lazily: importing sophia_kernels never imports triton)."""
