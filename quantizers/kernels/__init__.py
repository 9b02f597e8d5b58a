"""Triton kernels for the quantizers (each also runs on the CPU under ``TRITON_INTERPRET=1``)."""
