"""The Freelancer users API client."""

from app.upstream.client import FreelancerClient, UpstreamBatch, create_http_client

__all__ = ["FreelancerClient", "UpstreamBatch", "create_http_client"]
