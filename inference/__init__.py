"""The model server: OpenAI-compatible inference over base models and trained adapters."""
