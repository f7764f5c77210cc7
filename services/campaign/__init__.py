"""The fault-tolerance campaign: every scenario under every recovery strategy, every
answer checked against the reference, the recoveries measured and reported."""
