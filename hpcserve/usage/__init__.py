"""Usage and cost (``hpcserve usage``): GPU-hours from sacct, tokens from the gateway's counters, the site's
price per GPU-hour. ``compute`` is pure (listed in the import-linter contract); ``hpcserve.api.usage``
gathers its inputs."""
