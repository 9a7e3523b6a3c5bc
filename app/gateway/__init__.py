"""The heart of the service: single-flight lookups and the batching worker."""

from app.gateway.gateway import Failure, Gateway, LookupResult

__all__ = ["Failure", "Gateway", "LookupResult"]
