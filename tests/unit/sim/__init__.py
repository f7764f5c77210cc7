"""Test harnesses for the Raft core: a seeded whole-history simulation and a hand-driven cluster."""
