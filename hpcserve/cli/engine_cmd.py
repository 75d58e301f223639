"""``hpcserve engine-sim``: hpcserve's vLLM-protocol engine simulator, for tests, demos and trace replay.

Flags that vLLM's ``vllm serve`` also has mean the same here; the rest tune the latency model. Their
defaults come from ``hpcserve.model.engine_defaults.ENGINE_SIM`` (as ``SimConfig``'s do).
"""

from __future__ import annotations

import click

from hpcserve.errors import ValidationError
from hpcserve.model.engine_defaults import ENGINE_SIM as D

SIM_HELP = """Run hpcserve's engine SIMULATOR (not vLLM, no GPU, no weights) for MODEL.

It serves vLLM's OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models, /health) and
vLLM's /metrics names, with a continuous-batching latency model. Every response carries the header
`x-hpcserve-engine: simulator`. SIGTERM drains: new requests get 503, requests in flight finish, exit 0.
"""


@click.command("engine-sim", help=SIM_HELP, short_help="Run the vLLM-protocol engine simulator (not vLLM).")
@click.argument("model_arg", metavar="[MODEL]", required=False)
@click.option("--model", help="Model name (as vllm serve's --model; the positional MODEL also works).")
@click.option("--served-model-name", help="Name clients send and metrics carry [default: MODEL].")
@click.option("--host", default=D.host, show_default=True, help="Address to bind.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=D.port,
    show_default=True,
    help="Port to bind (0: any free port, printed in the log).",
)
@click.option(
    "--max-model-len",
    type=click.IntRange(2),
    default=D.max_model_len,
    show_default=True,
    help="Longest prompt + completion, in tokens; longer requests get 400.",
)
@click.option(
    "--max-num-seqs",
    type=click.IntRange(1),
    default=D.max_num_seqs,
    show_default=True,
    help="Sequences in the running batch; more wait in a FIFO queue.",
)
@click.option(
    "--prefill-tokens-per-s",
    type=click.FloatRange(min=1, min_open=False),
    default=D.prefill_tokens_per_s,
    show_default=True,
    help="Simulator: prompt tokens prefilled per second.",
)
@click.option(
    "--decode-ms-per-token",
    type=click.FloatRange(min=0),
    default=D.decode_ms_per_token,
    show_default=True,
    help="Simulator: one decode step for a lone sequence, in ms.",
)
@click.option(
    "--decode-growth",
    type=click.FloatRange(min=0),
    default=D.decode_growth,
    show_default=True,
    help="Simulator: a full batch's decode step is (1 + this) times a lone sequence's.",
)
@click.option(
    "--startup-delay",
    type=click.FloatRange(min=0),
    default=D.startup_delay_s,
    show_default=True,
    help="Simulator: seconds /health answers 503 (a model load) after binding.",
)
@click.option(
    "--kv-tokens",
    type=click.IntRange(1),
    default=D.kv_tokens,
    show_default=True,
    help="Simulator: KV-cache capacity in tokens (for vllm:kv_cache_usage_perc and admission).",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=D.drain_timeout_s,
    show_default=True,
    help="Simulator: seconds SIGTERM waits for requests in flight.",
)
@click.option(
    "--seed", type=int, default=D.seed, show_default=True, help="Simulator: completion text offset."
)
@click.option(
    "--enable-sleep-mode",
    is_flag=True,
    help="As vLLM's: /sleep, /wake_up and /is_sleeping work (mounted with VLLM_SERVER_DEV_MODE=1).",
)
@click.option(
    "--weights-gib",
    type=click.FloatRange(min=0, min_open=True),
    help="Simulator: weight size for sleep/wake times [default: from the model name, e.g. 8B: 14.9].",
)
@click.option(
    "--sleep-time-scale",
    type=click.FloatRange(min=0, min_open=True),
    default=D.sleep_time_scale,
    show_default=True,
    envvar="HPCSERVE_ENGINE_SIM_SLEEP_TIME_SCALE",
    help="Simulator: multiply every modelled sleep/wake duration (e.g. 0.1 in tests).",
)
@click.option(
    "--gpu-memory-utilization",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=0.9,
    show_default=True,
    help="As vLLM's: the share of the GPU's memory the engine takes (a replica on GPU shards gets its "
    "fraction). The simulator holds no GPU memory: it logs the value at start.",
)
def engine_sim(
    model_arg: str | None,
    model: str | None,
    served_model_name: str | None,
    host: str,
    port: int,
    max_model_len: int,
    max_num_seqs: int,
    prefill_tokens_per_s: float,
    decode_ms_per_token: float,
    decode_growth: float,
    startup_delay: float,
    kv_tokens: int,
    drain_timeout: float,
    seed: int,
    enable_sleep_mode: bool,
    weights_gib: float | None,
    sleep_time_scale: float,
    gpu_memory_utilization: float,
) -> None:
    import logging

    from hpcserve.enginesim.server import SimConfig, run

    name = _model_name(model_arg, model)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s hpcserve-engine-simulator %(message)s")
    logging.info("gpu memory utilization %g (simulated: no GPU memory is held)", gpu_memory_utilization)
    run(
        SimConfig(
            model=name,
            served_model_name=served_model_name,
            host=host,
            port=port,
            max_batch=max_num_seqs,
            prefill_tokens_per_s=prefill_tokens_per_s,
            decode_s_per_token=decode_ms_per_token / 1000,
            decode_growth=decode_growth,
            startup_delay_s=startup_delay,
            max_model_len=max_model_len,
            kv_tokens=kv_tokens,
            seed=seed,
            drain_timeout_s=drain_timeout,
            enable_sleep_mode=enable_sleep_mode,
            weights_gib=weights_gib,
            sleep_time_scale=sleep_time_scale,
        )
    )


def _model_name(positional: str | None, option: str | None) -> str:
    if positional and option and positional != option:
        raise ValidationError(f"engine-sim: MODEL {positional!r} and --model {option!r} differ; give one")
    name = positional or option
    if not name:
        raise ValidationError("engine-sim: no model given (fix: hpcserve engine-sim MODEL, or --model MODEL)")
    return name
