"""What people and other programs touch: the CLI (``weightpool``) and, later, the admin API."""
