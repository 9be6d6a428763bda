"""Checkpoint readers and writers: Hugging Face safetensors / torch / Flax, OpenAI TensorFlow."""
