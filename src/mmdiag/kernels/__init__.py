"""GPU kernels, each with its pure-PyTorch reference beside it.

A kernel and its reference compute the same operation and take the same arguments; the tests
hold the kernel to the reference. Every operation has a dispatcher that runs the kernel where
it can run (Triton on CUDA, or on CPU through Triton's interpreter) and falls back to the
reference elsewhere, so code that calls the dispatcher runs on any device.
"""
