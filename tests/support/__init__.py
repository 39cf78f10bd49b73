"""Helpers the tests share: tiny trainers on the counting task (``trainers``)."""
