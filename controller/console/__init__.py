"""The read-only web console (`maia-controller --http-listen`): rack map, power, deployments, usage."""
