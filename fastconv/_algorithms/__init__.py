"""One module per algorithm; the registry in ``fastconv._dispatch`` lists them."""
