"""Fine-tuning a converted ViT on our shards with accelerate (`vit-finetune`)."""
