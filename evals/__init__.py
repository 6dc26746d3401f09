"""Evaluation: the lm-evaluation-harness backends (`xlaserve`, `xlaserve-grpc`)."""
