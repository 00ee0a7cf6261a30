"""The LightningModule (`diffusion_module`) and the backbones (`components`)."""
