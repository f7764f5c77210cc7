"""The fault-injector: fault specs, their schedule, auto-revert and guardrails."""
