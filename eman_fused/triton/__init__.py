"""Triton twins of the C++/CUDA kernels (imported when triton can run here)."""
