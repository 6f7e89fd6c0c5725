"""issuers package."""
