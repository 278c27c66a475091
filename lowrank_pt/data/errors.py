"""The one exception the data pipeline raises for bad inputs."""


class DataError(ValueError):
    """A data source, tokenizer or shard cannot be used; the message names the file or field.

    A subclass of ValueError so that callers validating a config catch it alongside the
    config's own ValueErrors.
    """
