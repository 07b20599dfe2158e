"""Stable actor names in the pool's namespace (DESIGN section 3): Serve replicas and restarted
actors find each other by these names, never by a home-made registry of handles."""

CONTROLLER_NAME = "weightpool-controller"


def tier_actor_name(tier_id: str) -> str:
    return f"weightpool-tier:{tier_id}"
