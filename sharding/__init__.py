"""Device meshes, logical-axis sharding rules and multi-host start-up. Not yet implemented."""
