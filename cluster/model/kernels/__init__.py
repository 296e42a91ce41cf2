"""CPU kernels for the model's hot matmuls (MXFP4 experts), each with a fallback where it cannot run."""
