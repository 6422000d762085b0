"""The HTTP server: OpenAI-compatible API and web UI over the models exported to serve/models/."""
