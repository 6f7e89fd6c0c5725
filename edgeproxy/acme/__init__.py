"""acme package."""
