"""Recovery: strategies, circuit breakers and escalation; decides and orders each recovery."""
