"""Messages of the libraries under a training run that are not the user's business, silenced."""

import logging
import warnings


class DropMessages(logging.Filter):
    """Drops log records whose message holds any of `fragments`."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


LIGHTNING_TIPS = DropMessages("litlogger", "Trainer already configured with model summary callbacks",
                              "was configured so 100% of the batches")
LITDATA_CACHE_SIZE = DropMessages("max_cache_size is unset")


def silence_library_noise() -> None:
    """Lightning's advertisement for its cloud logger, its note that our model-summary callback replaces its own, its
    note that `limit_val_batches=1.0` (the config's default) uses every batch, the deprecation it raises itself
    through torch's pytree (LeafSpec) on every step, and litdata's line on the size of a download cache that local
    shards (read in place) never fill."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(LIGHTNING_TIPS)  # adding twice keeps one
    logging.getLogger("litdata.utilities.format").addFilter(LITDATA_CACHE_SIZE)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
