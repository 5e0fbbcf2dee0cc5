"""The official evaluation rule reproduces the golden `expected_metrics`.

Facts from tests/golden/README.md (section Metrics): `metrics_inputs.safetensors`
holds 8 synthetic 32x32 score maps (`pixel_pred`, leaving [0, 1]) with pixel
labels (`pixel_label`), raw image scores (`image_pred`) and image labels
(`image_label`); `config.json["expected_metrics"]` holds what the official
`metrics_eval` prints for each domain, i.e. round(fraction, 4) * 100.
"""
from __future__ import annotations

import json

import pytest

from moeclip.metrics import ClassAccumulator, evaluate_class, official_round, to_official


@pytest.fixture(scope="module")
def golden(golden_dir):
    from safetensors.numpy import load_file

    inputs = load_file(str(golden_dir / "metrics_inputs.safetensors"))
    expected = json.loads((golden_dir / "config.json").read_text())["expected_metrics"]
    return inputs, expected


@pytest.mark.parametrize("domain", ["Industrial", "Medical"])
def test_expected_metrics_exactly(golden, domain):
    d, expected = golden
    result = evaluate_class(d["pixel_pred"], d["pixel_label"], d["image_pred"], d["image_label"], domain)
    assert to_official(result) == expected[domain]  # exact, after the official rounding
    assert all(0.0 <= v <= 1.0 for v in result.values() if v is not None)


@pytest.mark.parametrize("domain", ["industrial", "medical"])
def test_accumulator_in_batches(golden, domain):
    d, expected = golden
    acc = ClassAccumulator(domain, num_images=8, image_shape=(32, 32))
    for s in (slice(0, 3), slice(3, 8)):
        acc.add(d["pixel_pred"][s], d["pixel_label"][s], d["image_pred"][s], d["image_label"][s])
    got = acc.compute()
    assert to_official(got) == expected[domain.capitalize()]


def test_rule_matters(golden):
    """Skipping the image-score normalisation would change the industrial image AUROC."""
    d, expected = golden
    img = d["image_pred"]
    assert img.max() > 1  # the golden exercises the normalisation
    from moeclip.metrics import auroc

    maps = d["pixel_pred"]
    pmax = (maps.max(axis=(1, 2)) - maps.min()) / (maps.max() - maps.min())
    unnormalised = auroc(pmax * 0.5 + img * 0.5, d["image_label"])
    assert official_round(unnormalised) != expected["Industrial"]["image AUC"]
