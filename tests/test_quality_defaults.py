"""The token layout lives in one place, the quantize stage records only what the codes are."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def test_quantize_does_not_import_the_transformer():
    code = "import sys, vqvae.quantize; print(sorted(m for m in sys.modules if m.startswith('transformer')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_vocab_and_model_config_share_one_layout():
    from transformer.model import GPTConfig
    from transformer.vocab import Vocab

    vocab = Vocab(16, (4, 4), ("a", "b", "c"))
    model = GPTConfig(codebook_size=16, num_classes=3, grid_shape=(4, 4), n_layer=1, n_head=1, n_embd=8,
                      window_size=0)
    for layout in (vocab, model):
        assert (layout.sos_id, layout.vocab_size, layout.class_token(2)) == (16, 20, 19)
        assert layout.prefix(torch.tensor([-1, 0, 2])).tolist() == [16, 17, 19]
        with pytest.raises(ValueError):
            layout.class_token(3)
    assert Vocab(16, (4, 4)).prefix(torch.tensor([-1, -1])).tolist() == [16, 16]  # unconditional: SOS only


def test_vocab_json_records_codes_grid_and_classes_only(tmp_path):
    from transformer.vocab import Vocab
    from vqvae.quantize import CodeGrids

    path = tmp_path / "vocab.json"
    path.write_text(CodeGrids(300, (8, 8), ("cat", "dog")).to_json())
    assert json.loads(path.read_text()) == {"codebook_size": 300, "grid_shape": [8, 8], "classes": ["cat", "dog"]}
    vocab = Vocab.load(path)
    assert (vocab.grid_shape, vocab.num_classes, vocab.class_token(1)) == ((8, 8), 2, 302)
    # runs written before the layout moved to the transformer carried more keys: still readable
    path.write_text(json.dumps({"codebook_size": 300, "grid_shape": [8, 8], "image_size": 32, "classes": [],
                                "sos_id": 300, "vocab_size": 301, "class_to_token": {}}))
    assert Vocab.load(path) == Vocab(300, (8, 8), ())



def test_default_guidance_applies_to_conditional_models_only(tracking_dir, dataset, vqvae_run, tmp_path):
    """Guidance is on by default for a class-conditional model; an unconditional one samples with the defaults
    (an explicit --cfg-scale there is still an error)."""
    import pandas as pd

    from conftest import TINY_GPT, invoke, last_line

    from transformer.generate import DEFAULT_CFG_SCALE
    from transformer.sample import top_k_for
    unlabelled = tmp_path / "unlabelled.csv"
    df = pd.read_csv(dataset).drop(columns="label")
    df.assign(image_path=[str(dataset.parent / p) for p in df.image_path]).to_csv(unlabelled, index=False)
    run_ids = {}
    for name, manifest in (("conditional", dataset), ("unconditional", unlabelled)):
        res = invoke("quantize", "--vqvae-run-id", vqvae_run, "--manifest", manifest, "--num-workers", "0")
        assert res.exit_code == 0, res.output
        res = invoke("train", "--quantize-run-id", last_line(res.stdout), *TINY_GPT)
        assert res.exit_code == 0, res.output
        res = invoke("generate", "--transformer-run-id", last_line(res.stdout), "--num-samples", "2")
        assert res.exit_code == 0, res.output
        run_ids[name] = last_line(res.stdout)
    from core.tracking import download

    settings = {k: json.loads(download(r, "settings.json").read_text()) for k, r in run_ids.items()}
    used = {k: s["cfg_scale"] for k, s in settings.items()}
    assert used == {"conditional": DEFAULT_CFG_SCALE, "unconditional": 1.0} and DEFAULT_CFG_SCALE > 1
    # the top-k a run sampled with is recorded: the default share of this 32-code book is its floor, 5
    assert {s["top_k"] for s in settings.values()} == {top_k_for(None, 32)} == {5}
