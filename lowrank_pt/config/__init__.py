"""One config schema: the recipe's dataclasses with a docstring under each field, loaded through
OmegaConf and checked completely before any write (``recipe``), and the reference generated from
those docstrings (``schema``)."""
