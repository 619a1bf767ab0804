"""Stage `digest` (scratch): the headline's pair names → reports/digest.json."""

from __future__ import annotations

from ato.artifacts import HeadlineMetrics, Layout, write_json_atomic
from ato.params import Params


def main(params: Params) -> None:
    layout = Layout.from_params(params)
    headline = HeadlineMetrics.read(layout.headline)
    write_json_atomic(layout.digest, {"pairs": sorted(headline.pairs)})
