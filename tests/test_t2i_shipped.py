"""The shipped embedded text-to-image model (weights/nextscale_t2i_*): its card describes the files that ship (names,
sizes, the configs stored in them), records every bar as met with figures that agree with its bars, and the files
load into the models the card names and draw different pictures for different prompts at the card's settings.
(That the nodes list and load files of these names: tests/test_t2i_embedded.py.)"""

from __future__ import annotations

import json
import os

import pytest
import torch
from nextscale.models.infinity.bsq import BSQTokenizer
from nextscale.models.infinity.model import Infinity
from test_t2i_embedded import CARD
from test_t2i_embedded import FILES as EMBEDDED_NAMES  # the names the nodes are checked to resolve

from training import common, t2i, t2i_evaluate, t2i_text, train_t2i

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")
FILES = {role: os.path.join(WEIGHTS, name) for role, name in EMBEDDED_NAMES.items()}


@pytest.fixture(scope="module")
def card() -> dict:
    with open(os.path.join(WEIGHTS, CARD), encoding="utf-8") as f:
        return json.load(f)


def test_card_describes_the_shipped_files(card):
    assert card["name"] == "nextscale-embedded-t2i" and card["family"] == "infinity"
    assert card["files"] == {role: os.path.basename(p) for role, p in FILES.items()}
    assert card["sizes_bytes"] == {role: os.path.getsize(p) for role, p in FILES.items()}
    assert card["tokenizer_config"] == BSQTokenizer.config_from_file(FILES["tokenizer"]).to_dict()
    assert card["generator_config"] == Infinity.config_from_file(FILES["generator"]).to_dict()
    assert card["text_encoder_config"] == common.read_safetensors(FILES["text_encoder"])[1]
    assert {role: name for role, name in t2i.SHIPPED.items() if role != "card"} == card["files"]
    # the card records the recipe that made the files
    assert card["training_commands"][1:] == t2i.shell_lines(os.path.join(common.repo_root(), "runs", "t2i"))


def test_card_meets_every_bar(card):
    metrics, bars = card["metrics"], card["bars"]
    assert bars == t2i_evaluate.BARS
    assert all(metrics["bars_met"].values()) and set(metrics["bars_met"]) == set(bars)
    assert metrics["tokenizer_psnr_db"] >= bars["tokenizer_psnr_db"]
    assert metrics["classifier_categories"] >= 20
    assert metrics["category_accuracy_over_chance"] >= bars["category_accuracy_over_chance"]
    assert len(metrics["frechet_ratio"]) >= 2 and len({r["cfg"] for r in metrics["frechet_ratio"]}) >= 2
    assert sum(card["sizes_bytes"].values()) / 2**20 <= bars["shipped_mb"]
    assert metrics["four_images_s_one_thread"] < bars["four_images_s_one_thread"]


def test_shipped_model_draws_the_prompt(card):
    tokenizer = BSQTokenizer.from_file(FILES["tokenizer"]).eval()
    model = t2i_evaluate.load_model(FILES["generator"], FILES["text_encoder"])
    ptok = t2i_text.PromptTokenizer(None)
    sampling = card["default_sampling"]
    assert [list(s) for s in train_t2i.SCHEDULE.scales] == sampling["schedule"]

    def draw(prompts, seed):
        return train_t2i.generate(model, tokenizer, prompts, ptok, seed=seed, cfg=sampling["cfg"], tau=sampling["tau"])

    a = draw(["red star", "green tree"], seed=0)
    assert tuple(a.shape) == (2, 3, card["resolution"], card["resolution"]) and torch.isfinite(a).all()
    torch.testing.assert_close(draw(["red star", "green tree"], seed=0), a)  # a seed is a picture
    assert (a[0] - a[1]).abs().mean() > 0.05  # two prompts, two pictures
