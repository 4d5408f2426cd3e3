"""Tests that need no server: they run in seconds (`pytest tests/unit`)."""
