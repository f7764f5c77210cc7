"""The browser agent: headless browsers hosting model shards, health, capabilities, fault hooks."""
