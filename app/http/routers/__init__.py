"""The routes, one module per resource: HTTP in, a gateway or service call, HTTP out."""
