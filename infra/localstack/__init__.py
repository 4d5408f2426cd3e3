"""The local stack: the production topology as plain processes on one machine."""
