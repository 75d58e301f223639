"""The service: the one process that owns hpcserve's state. It serves the HTTP API (a Unix socket with the
kernel's SO_PEERCRED, optionally TCP with munge credentials) and runs the scheduler's jobs (serving
controller, sampler, rebalancer, retention). Users never touch its database."""
