"""The command line (and, later, the gRPC server)."""
