"""refundguard streams: the Faust app, topics, image fetching, state, metrics and the CLI."""

__version__ = "0.1.0"
