"""User-facing errors: one clear line, no traceback (unless HYDRA_FULL_ERROR=1)."""


class ConfigError(ValueError):
    """A bad override or file: the message names the key and what is allowed."""


class NonFiniteError(ConfigError):
    """NaN or inf in a training loss, the weights, a sampler's output or a decoded latent: the message names the step."""
