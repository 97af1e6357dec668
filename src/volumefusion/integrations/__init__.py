"""Bridges to other frameworks; each needs an optional extra and imports it only when used."""
