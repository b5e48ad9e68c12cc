"""kubellm: LLM serving on Kubernetes (an inference engine and its operator)."""

__version__ = "0.1.0"
