"""Async JSON microservice over the PostgreSQL table playing_with_neon."""

__version__ = "0.1.0"
