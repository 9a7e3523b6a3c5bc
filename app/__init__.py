"""Freelancer user-info gateway: a single-flight cache in front of Freelancer's users API."""

__version__ = "0.1.0"
