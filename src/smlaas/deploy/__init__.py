"""Deploying a sealed build: the coordinator, one worker per stage and the gateway."""
