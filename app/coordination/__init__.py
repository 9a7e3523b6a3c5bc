"""How several processes act as one gateway: the `Coordinator` and `Budget` seams over Redis.

Without REDIS_URL the gateway uses its in-process implementations and this package is
never imported.
"""
