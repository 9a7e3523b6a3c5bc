"""The HTTP edge: the only package (with `app.main`) that meets FastAPI, Starlette or Prometheus.

Routers turn HTTP into calls on the gateway and the job service and back; around them sit
the one ASGI middleware, authentication, client limits, the schemas `/docs` shows, the
offline docs, the metrics and the handlers that map the exception tree to responses.
"""
