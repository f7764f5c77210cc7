"""The bootstrap every webshard service runs on.

Server, health, reflection, tracing, logs and settings.
"""
