"""Task data: prompt templates, GLUE and instruction datasets, collators."""
