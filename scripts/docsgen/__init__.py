"""The manual's generated reference pages (docs/reference/), written by scripts/docs_gen.py.

Each module renders one page from the code's own description of itself: the settings models
(config_ref), the Typer app (cli_ref), the OpenAPI document (http_ref), advice.toml
(advice_ref), the transports' registry (pages, through postroom.diagnostics.api_providers).
One module writes code instead: sendmail_spec, postroom-sendmail's pydantic-free view of
the settings models (a block of src/postroom/ingress/sendmail_settings.py).
Nothing in postroom imports this package: it costs the server and the CLI nothing.
"""
