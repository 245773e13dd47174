"""Quantization: number formats (`formats`) and their specs (`specs`), the
kinds of numbers a run rounds (`kinds`), rounding kernels per backend
(`torch_kernels`, `triton_kernels`, `backends`), the noise of stochastic
rounding (`noise`), the quantizer module (`quantizer`) and the optimizer
wrapper (`optim`)."""
