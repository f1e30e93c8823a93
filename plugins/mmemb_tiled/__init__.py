"""The tiled contrastive loss: PyTorch tiles on any device, a Triton kernel on CUDA."""
