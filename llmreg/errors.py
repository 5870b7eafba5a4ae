"""Bad input a user can fix: a missing path, a misspelt option, a dataset without the needed columns, a rerun into an
output directory made with other settings. The recipes and the ``llmreg`` command print it as one line naming the
problem and the fix, without a traceback, and exit non-zero. Anything else keeps its traceback."""


class InputError(ValueError):
    """Bad input, with a message that says what is wrong and how to fix it."""
