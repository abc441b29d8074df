"""Crash-safe verified updates: the state machine, A/B slots, the fetcher and the updater."""
