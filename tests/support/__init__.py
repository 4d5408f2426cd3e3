"""Helpers the tests and the fault suite share (not fixtures: those live in conftest)."""
