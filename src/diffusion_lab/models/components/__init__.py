"""Backbones. Every one is called as net(x, t, *, x_self_cond=None, class_labels=None) -> Tensor of
shape (B, out_channels, H, W), with t a float tensor (B,) of (possibly fractional) timesteps."""
