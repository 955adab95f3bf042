"""Serving a partitioned model: stage workers, the gateway and what they exchange."""
