"""The heart of the service: single-flight lookups and the batching worker."""

from app.gateway.gateway import Gateway
from app.gateway.results import Failure, LookupResult, Outcome, Reason, Source

__all__ = ["Failure", "Gateway", "LookupResult", "Outcome", "Reason", "Source"]
