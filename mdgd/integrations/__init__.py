"""Integrations with training frameworks, imported on demand (``mdgd.integrations.hf``)."""
