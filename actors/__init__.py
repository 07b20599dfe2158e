"""The Ray runtime: tier actors, the placement controller, the lease client (DESIGN sections 3-5).

Start a pool with ``actors.pool.start_pool``; read blocks with ``actors.client.PoolClient``.
"""
