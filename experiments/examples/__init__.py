"""Worked examples of research extensions (see docs/extending.md); importing one registers what it defines."""
