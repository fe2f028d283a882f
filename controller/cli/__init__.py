"""maiactl: the operator's command-line client for the Maia controller (gRPC AdminService and
DeploymentService), plus `maiactl solve`, which runs the scheduler library locally."""
