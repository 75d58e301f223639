"""GPU telemetry inside hpcserve's jobs: an NVML sampler (``nvml``), the reporter that sends its samples to
the service (``reporter``), recordings of real devices for tests (``recorded``), and the pure pieces they
share (``devices``: CUDA_VISIBLE_DEVICES to NVML devices; ``batching``: report bodies and back-off)."""
