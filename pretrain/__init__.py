"""ViT pre-training: model family, objectives, DeepSpeed trainer, checkpoint conversion."""
