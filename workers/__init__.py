"""Launchable worker processes of the distributed pipeline (drafter, verifier).

Each worker is thin glue: a Redis Streams loop (``cosine`` broker layer) around the engine
(``cosine.engine``) and the policies. They arrive with the distributed pipeline; until then the
single-process engine (``cosine.engine.speculative``) is the way to run the models.
"""
