"""Helpers the tests share: real services (not fakes), gates that hold them at a known point, and
comparisons of results that may round differently."""
