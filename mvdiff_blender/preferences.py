"""Placeholder until written."""

classes = ()
