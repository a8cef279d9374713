"""Subcommands of the later stages (export, generate, compare, ...), kept apart from the CLI core."""

ADDERS: list = []
