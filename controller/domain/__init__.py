"""The controller's domain values: below the use cases and the store, importing neither.

Plain frozen dataclasses and pure rules that both the use cases (`controller.usecases`) and the
persistence layer (`controller.store`) speak: `values` (what goes in and out of a use case),
`phases` (a deployment's phase from its placements), `paging` (the bounds of one page),
`changes` (what a cluster generation bump changed), `liveness` (when a silent node is suspect,
down, evicted), `restarts` (when a failed replica is placed again). The
import-linter layers contract in pyproject.toml keeps this package free of the layers above it.
"""
