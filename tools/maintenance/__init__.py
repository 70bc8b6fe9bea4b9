"""Offline gallery maintenance: backup, migrate, rebuild."""
