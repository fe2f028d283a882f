"""What the controller tells operators about itself: Prometheus metrics (`metrics.py`), the
cluster gauges read for a scrape (`cluster.py`: allocation and the tenants' metered usage, which
`store/metering.py` keeps), and the event loop's lag (`loop.py`)."""
