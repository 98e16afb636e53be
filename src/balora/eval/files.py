"""Moved to `balora.io` (the one home of readers and atomic writers); these names stay importable from here."""

from balora.io import read_rows, require_fields, write_json_atomic, write_jsonl_atomic, write_text_atomic

__all__ = ["read_rows", "require_fields", "write_json_atomic", "write_jsonl_atomic", "write_text_atomic"]
