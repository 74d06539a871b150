"""One module per verb: flags -> config dataclass -> one library call; only this package prints."""
