"""The coordinator: agent registry, shard placement, request routing, replicated cluster state."""
