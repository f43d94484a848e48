"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """A user mistake in a recipe, a source or a prepared folder; the message names the fix."""
