"""lrm: shared core of the latent-reward-model toolkit (config, registry, I/O, latent space, text).

The toolkit's packages sit beside this one: ``shapes`` (built-in world), ``reward_adapters``,
``data_cache``, ``latent_rewards``, ``distill`` and ``eval``.
"""

__version__ = "0.1.0"
