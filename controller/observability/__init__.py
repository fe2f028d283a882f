"""What the controller tells operators about itself: Prometheus metrics (and usage metering)."""
