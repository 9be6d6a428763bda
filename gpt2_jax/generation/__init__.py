"""Generation: compiled prefill / decode over a static KV cache, a ``while_loop`` sampler, beam search,
streaming, a text API and the ``gpt2-jax generate`` command."""
