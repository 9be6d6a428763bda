"""gpt2-jax: a pure-functional GPT-2 in JAX/Flax. The public API, re-exported."""
