"""Pure PyTorch: per-modality encoders, the multimodal Transformer teacher, co-training losses."""
