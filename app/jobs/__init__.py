"""Crawl jobs: many ids fetched in the background within Freelancer's budget, kept in the store."""
