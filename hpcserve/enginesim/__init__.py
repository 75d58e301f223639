"""hpcserve's engine SIMULATOR: a stand-in for vLLM that speaks its HTTP API and metric names, with a
latency model instead of a GPU, for tests, benchmarks and demos. Not product code: nothing in hpcserve's
serving path imports it (an import-linter contract checks that); replicas run it as a separate process
(``python -m hpcserve engine-sim``)."""
