"""`mimo serve`: the OpenAI- and Ollama-compatible HTTP server and its output parsers."""
