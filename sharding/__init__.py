"""Device meshes, the logical-axis sharding rules, weight placement and multi-host start-up."""
