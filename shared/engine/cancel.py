"""The one exception a cancelled call raises, from the decode loop up through every backend."""


class Cancelled(Exception):
    """The call was cancelled while the model was running."""
