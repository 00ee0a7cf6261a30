"""Training callbacks: EMA of the weights, sample media."""
