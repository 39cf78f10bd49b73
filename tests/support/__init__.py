"""Helpers the tests share: tiny models and data (``tiny``), tiny trainers on the counting task (``trainers``),
a local fake of the Hub's HTTP API (``fake_hub``), a Flower deployment on loopback (``flower_cluster``), recipe
runs (``recipes``), the docs' commands (``doc_commands``) and scripts loaded by path (``scripts``)."""
