"""Image data sets (uint8, C x H x W) and the LightningDataModule that scales them to [-1, 1]."""
