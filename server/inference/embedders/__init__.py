"""Embedding runtimes: one module per runtime, plus export and auto-selection."""
