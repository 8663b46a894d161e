"""lmmkit: build, train, evaluate and serve LLaVA-family vision-language models."""

__version__ = "0.1.0"

IMAGE_TOKEN = "<image>"
