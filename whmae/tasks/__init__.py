"""Fine-tuning tasks on the pretrained encoder: phenotype regression, segmentation."""
