"""Feature explanations from the Neuronpedia API (`select.neuronpedia: true`; online, never in the
default run). Only sae-lens pretrained releases listed on Neuronpedia have an id."""

from __future__ import annotations

from .errors import FeatureScoreError

NEURONPEDIA_API = "https://www.neuronpedia.org/api/feature"


def fetch_neuronpedia(neuronpedia_id: str | None, features: list[int], timeout: float = 10.0) -> dict[int, list[str]]:
    """Explanations per feature; with no features, only checks that a fetch could run (fail early)."""
    import json
    import urllib.error
    import urllib.request

    from ato.models import offline

    if not neuronpedia_id:
        raise FeatureScoreError(
            "select.neuronpedia: the SAEs have no Neuronpedia id (only sae-lens pretrained "
            "releases listed on Neuronpedia have one); set select.neuronpedia: false"
        )
    if offline():
        raise FeatureScoreError(
            "select.neuronpedia: true needs network access, but this run is offline "
            "(HF_HUB_OFFLINE=1, the default of `ato`); export HF_HUB_OFFLINE=0 or set "
            "select.neuronpedia: false"
        )
    model_id, sae_set = neuronpedia_id.split("/", 1)
    out: dict[int, list[str]] = {}
    for f in features:
        url = f"{NEURONPEDIA_API}/{model_id}/{sae_set}/{f}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # a fixed https host
                data = json.loads(resp.read().decode())
        except (urllib.error.URLError, TimeoutError, ValueError) as exc:
            raise FeatureScoreError(
                f"select.neuronpedia: fetching {url} failed ({exc}); check the network or set select.neuronpedia: false"
            ) from exc
        out[f] = [e.get("description", "") for e in data.get("explanations") or []]
    return out
