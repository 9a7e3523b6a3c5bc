"""The Freelancer users API client, and the `Upstream` protocol it satisfies."""

from app.upstream.base import Upstream, UpstreamBatch
from app.upstream.client import FreelancerClient, create_http_client

__all__ = ["FreelancerClient", "Upstream", "UpstreamBatch", "create_http_client"]
