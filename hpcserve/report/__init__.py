"""``hpcserve report``: one self-contained HTML page of where the GPUs went.

``data`` holds the report's typed records, their JSON (what ``GET /v1/report-data`` sends) and the pure
bucketing of store samples into time series; ``charts`` draws them with matplotlib as inline SVG; ``html``
turns the records and the charts into the page; ``render`` joins the last two.
"""

DEFAULT_POINTS = 240  # points per line on a chart (the service averages samples into as many buckets)
MAX_POINTS = 2000
