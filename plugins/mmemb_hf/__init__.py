"""Hugging Face backbones (LLaVA-OneVision, Qwen2-VL, CLIP/SigLIP, text encoders) and poolers."""
