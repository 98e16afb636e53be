"""Evaluation: GLUE metrics, answer checking for math, sandboxed execution of generated code."""
