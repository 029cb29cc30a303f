"""Process launchers, one module per process role (``verifier``, ``drafter``, ``controller``).

Each is thin: it takes the settings the command line built, loads what the role needs (models, tokenizer),
installs the SIGTERM/SIGINT handler, builds the role's service (``cosine.service``) and runs it until it
is told to stop. ``cosine worker verifier``, ``cosine worker drafter`` and ``cosine controller`` call them.
"""
