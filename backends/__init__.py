"""Backend packages. Each registers its implementations with ``hal.registry`` on import and
imports no accelerator library until an implementation is bound."""
