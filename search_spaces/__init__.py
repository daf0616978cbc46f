"""YAML search spaces over ``TrainConfig`` fields, and the loader that validates them."""

from search_spaces.loader import Param, SearchSpace, SearchSpaceError, builtin_spaces, load_space

__all__ = ["Param", "SearchSpace", "SearchSpaceError", "builtin_spaces", "load_space"]
