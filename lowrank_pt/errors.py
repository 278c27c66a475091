"""The project's expected-failure types, importable from anywhere without an import circle.

``ConfigError`` is raised for a config problem found before any work starts (the CLI turns it
into one message and exit code 2). Data problems have their own type, ``lowrank_pt.data.DataError``.
"""


class ConfigError(ValueError):
    """A config problem, reported before any work starts."""
