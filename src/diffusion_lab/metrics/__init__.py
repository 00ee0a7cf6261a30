"""Sample-quality and likelihood metrics: feature extractors, FID / KID / precision-recall over cached real
features, and the variational bound in bits/dim."""
