"""The Ray runtime: tier actors, the placement controller, the lease client (DESIGN sections 3-5).

Not built yet: see issue 5.
"""
