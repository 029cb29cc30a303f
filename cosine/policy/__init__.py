"""CoSine's policies: expertise routing, token fusion, batch scheduling, speculation control, cost models.

Pure code (standard library, numpy at most): no Redis, no torch. Workers and the controller apply them.
"""
