"""The one exception type of the data pipeline."""
from moetrain.config.mapping import one_line


class DataError(ValueError):
    """A user mistake in a recipe, a source or a prepared folder; the message names the fix (one line)."""

    def __str__(self) -> str:
        return one_line(super().__str__())
