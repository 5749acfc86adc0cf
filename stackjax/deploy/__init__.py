"""Deployment: the governed OpenAI client, crash-safe call logs, probes, graders and the
surrogate server (a simulator of an OpenAI-compatible API, for offline use)."""
