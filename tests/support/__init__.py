"""Helpers the tests share (real services, not fakes)."""
