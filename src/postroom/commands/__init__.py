"""Operator commands of the `postroom` CLI, one module per command group (registered in
postroom.cli). Each module imports only Typer at import time: `postroom sendmail`, which
shares the entry point, must start fast."""
