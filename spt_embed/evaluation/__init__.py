"""Evaluation through mteb's own evaluators on local copies of MTEB tasks."""
