"""Train, sample and evaluate image diffusion models with PyTorch Lightning and Hydra."""
