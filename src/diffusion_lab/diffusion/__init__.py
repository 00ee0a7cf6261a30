"""Diffusion processes: noise schedules and the forward/reverse process math."""
