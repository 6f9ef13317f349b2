"""Errors that reach the user.

Every failure caused by the user's input (a recipe, a data file, an override) is raised as a
`StacklabError` whose message is one line that names the bad key, file or value and, where it
can, what would be valid. The CLI prints that line and exits non-zero without a traceback;
anything else is a bug and keeps its traceback.
"""


class StacklabError(Exception):
    """A problem with the user's input, explained in one line."""


class RecipeError(StacklabError):
    """The recipe, or an override applied to it, is invalid."""


class DataError(StacklabError):
    """A data source, shard or derived data file is missing, empty or corrupt."""
