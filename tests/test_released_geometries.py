"""Every released tokenizer family imports with its own geometry, at reduced width, from official-named state dicts
with random weights written here from the official modules' layouts (taming-transformers ``Encoder``/``Decoder``,
LlamaGen ``vq_model.py``), not from our converter: the architecture comes from the file, never from a training
default (released taming models have 256-dim codes; our default --code-dim is 8).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import TINY_GPT, error_line, invoke, last_line
from test_import_export import lightning_ckpt


def _conv(sd: dict, name: str, cin: int, cout: int, k: int, g: torch.Generator) -> None:
    sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (1.0 / (cin * k * k)) ** 0.5
    sd[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.02


def _norm(sd: dict, name: str, ch: int, g: torch.Generator) -> None:
    sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(ch, generator=g)
    sd[f"{name}.bias"] = 0.1 * torch.randn(ch, generator=g)


def _resnet(sd: dict, name: str, cin: int, cout: int, g: torch.Generator) -> None:
    _norm(sd, f"{name}.norm1", cin, g)
    _conv(sd, f"{name}.conv1", cin, cout, 3, g)
    _norm(sd, f"{name}.norm2", cout, g)
    _conv(sd, f"{name}.conv2", cout, cout, 3, g)
    if cin != cout:
        _conv(sd, f"{name}.nin_shortcut", cin, cout, 1, g)


def _attn(sd: dict, name: str, ch: int, g: torch.Generator) -> None:
    _norm(sd, f"{name}.norm", ch, g)
    for part in ("q", "k", "v", "proj_out"):
        _conv(sd, f"{name}.{part}", ch, ch, 1, g)


def _middle(sd: dict, names: tuple[str, str, str], ch: int, z_channels: int, g: torch.Generator) -> None:
    """Both formats: the encoder's middle (res, attention, res) and output conv, the decoder's input conv and middle."""
    for part in ("encoder", "decoder"):
        if part == "decoder":
            _conv(sd, "decoder.conv_in", z_channels, ch, 3, g)
        _resnet(sd, f"{part}.mid.{names[0]}", ch, ch, g)
        _attn(sd, f"{part}.mid.{names[1]}", ch, g)
        _resnet(sd, f"{part}.mid.{names[2]}", ch, ch, g)
        if part == "encoder":
            _norm(sd, "encoder.norm_out", ch, g)
            _conv(sd, "encoder.conv_out", ch, z_channels, 3, g)


def taming_state(ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 resolution: int, z_channels: int, embed_dim: int, n_embed: int, seed: int = 0) -> dict:
    """taming.modules.diffusionmodules.model Encoder/Decoder + VQModel names (latent-diffusion's VQModel too)."""
    g, sd = torch.Generator().manual_seed(seed), {}
    n = len(ch_mult)
    _conv(sd, "encoder.conv_in", 3, ch, 3, g)
    block_in, res = ch, resolution
    for i, mult in enumerate(ch_mult):
        for j in range(num_res_blocks):
            _resnet(sd, f"encoder.down.{i}.block.{j}", block_in, ch * mult, g)
            block_in = ch * mult
            if res in attn_resolutions:
                _attn(sd, f"encoder.down.{i}.attn.{j}", block_in, g)
        if i != n - 1:
            _conv(sd, f"encoder.down.{i}.downsample.conv", block_in, block_in, 3, g)
            res //= 2
    _middle(sd, ("block_1", "attn_1", "block_2"), block_in, z_channels, g)
    for i in reversed(range(n)):  # the decoder indexes its levels by resolution, as the encoder does
        for j in range(num_res_blocks + 1):
            _resnet(sd, f"decoder.up.{i}.block.{j}", block_in, ch * ch_mult[i], g)
            block_in = ch * ch_mult[i]
            if res in attn_resolutions:
                _attn(sd, f"decoder.up.{i}.attn.{j}", block_in, g)
        if i != 0:
            _conv(sd, f"decoder.up.{i}.upsample.conv", block_in, block_in, 3, g)
            res *= 2
    _norm(sd, "decoder.norm_out", block_in, g)
    _conv(sd, "decoder.conv_out", block_in, 3, 3, g)
    _conv(sd, "quant_conv", z_channels, embed_dim, 1, g)
    _conv(sd, "post_quant_conv", embed_dim, z_channels, 1, g)
    sd["quantize.embedding.weight"] = torch.empty(n_embed, embed_dim).uniform_(-1 / n_embed, 1 / n_embed,
                                                                                generator=g) * n_embed ** 0.5
    return sd


def llamagen_state(ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int, embed_dim: int,
                   codebook_size: int, seed: int = 0) -> dict:
    """LlamaGen tokenizer/tokenizer_image/vq_model.py names: attention after each res block of the lowest
    resolution only, the decoder list in forward order, the ``codebook_used`` ring buffer."""
    g, sd = torch.Generator().manual_seed(seed), {}
    n = len(ch_mult)
    _conv(sd, "encoder.conv_in", 3, ch, 3, g)
    block_in = ch
    for i, mult in enumerate(ch_mult):
        for j in range(num_res_blocks):
            _resnet(sd, f"encoder.conv_blocks.{i}.res.{j}", block_in, ch * mult, g)
            block_in = ch * mult
            if i == n - 1:
                _attn(sd, f"encoder.conv_blocks.{i}.attn.{j}", block_in, g)
        if i != n - 1:
            _conv(sd, f"encoder.conv_blocks.{i}.downsample.conv", block_in, block_in, 3, g)
    _middle(sd, ("0", "1", "2"), block_in, z_channels, g)
    for i in range(n):
        for j in range(num_res_blocks + 1):
            _resnet(sd, f"decoder.conv_blocks.{i}.res.{j}", block_in, ch * ch_mult[n - 1 - i], g)
            block_in = ch * ch_mult[n - 1 - i]
            if i == 0:
                _attn(sd, f"decoder.conv_blocks.{i}.attn.{j}", block_in, g)
        if i != n - 1:
            _conv(sd, f"decoder.conv_blocks.{i}.upsample.conv", block_in, block_in, 3, g)
    _norm(sd, "decoder.norm_out", block_in, g)
    _conv(sd, "decoder.conv_out", block_in, 3, 3, g)
    _conv(sd, "quant_conv", z_channels, embed_dim, 1, g)
    _conv(sd, "post_quant_conv", embed_dim, z_channels, 1, g)
    sd["quantize.embedding.weight"] = torch.randn(codebook_size, embed_dim, generator=g)
    sd["quantize.codebook_used"] = torch.randint(0, codebook_size, (65536,), generator=g).float()
    return sd


def taming_yaml(path: Path, ch: int, ch_mult, nrb: int, attn, resolution: int, z: int, embed: int, n: int,
                target: str = "taming.models.vqgan.VQModel") -> Path:
    path.write_text(yaml.safe_dump({"model": {"base_learning_rate": 4.5e-6, "target": target, "params": {
        "embed_dim": embed, "n_embed": n, "ddconfig": {
            "double_z": False, "z_channels": z, "resolution": resolution, "in_channels": 3, "out_ch": 3, "ch": ch,
            "ch_mult": list(ch_mult), "num_res_blocks": nrb, "attn_resolutions": list(attn), "dropout": 0.0},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}}))
    return path


def imported(*args) -> str:
    res = invoke("import-vqvae", *args)
    assert res.exit_code == 0, res.output
    return last_line(res.stdout)


def nearest_codes(latent: torch.Tensor, codebook: torch.Tensor, l2: bool) -> torch.Tensor:
    """The official lookup, written out: the nearest row of the file's own codebook (cosine when l2)."""
    flat = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1])
    if l2:
        flat, codebook = F.normalize(flat, dim=1), F.normalize(codebook, dim=1)
    idx = torch.cdist(flat.double(), codebook.double()).argmin(1)
    return idx.view(latent.shape[0], latent.shape[2], latent.shape[3])


def check_imported(run_id: str, state: dict, *, l2: bool, image: int, embed_dim: int, n_codes: int,
                   export_as: str | None, tmp_path: Path) -> None:
    """The imported model looks codes up in the file's codebook at the file's code dimension, encodes and decodes;
    export -> import gives the same indices."""
    from vqvae.tokenizer import load_tokenizer

    tok = load_tokenizer(run_id)
    q = tok.model.quantizer
    assert tok.cfg.code_dim == embed_dim and tok.cfg.embed_dim == embed_dim and tok.cfg.l2_norm == l2
    assert isinstance(q.proj_in, torch.nn.Identity) and isinstance(q.proj_out, torch.nn.Identity)
    assert q.codebook.shape == (n_codes, embed_dim)
    assert torch.equal(q.codebook, state["quantize.embedding.weight"].float())
    x = torch.rand(2, 3, image, image, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        idx = tok.encode(x)
        assert torch.equal(idx, nearest_codes(tok.model.encode_latents(x), state["quantize.embedding.weight"], l2))
        out = tok.decode(idx)
    f = tok.cfg.downsample_factor
    assert idx.shape == (2, image // f, image // f) and out.shape == x.shape and torch.isfinite(out).all()
    if export_as:
        file = tmp_path / f"exported_{run_id[:6]}.{'ckpt' if export_as == 'taming' else 'pt'}"
        res = invoke("export-vqvae", "--run-id", run_id, "--format", export_as, "--out", file)
        assert res.exit_code == 0, res.output
        extra = ["--config", file.with_suffix(".yaml")] if export_as == "taming" else ["--image-size",
                                                                                      tok.cfg.image_size]
        again = load_tokenizer(imported("--checkpoint", file, *extra))
        assert again.cfg.code_dim == embed_dim and torch.equal(again.encode(x), idx)


# Released families at reduced width: (ch, ch_mult, res blocks, attention resolutions, resolution, z, embed, codes)
TAMING = {
    "taming f16-1024": (32, (1, 1, 2, 2, 4), 2, (16,), 256, 256, 256, 1024),
    "taming f16-16384": (32, (1, 1, 2, 2, 4), 2, (16,), 256, 256, 256, 16384),
    "taming embed_dim != z_channels": (32, (1, 2, 2), 1, (8,), 32, 48, 24, 96),
    "latent-diffusion vq-f16": (32, (1, 1, 2, 2, 4), 2, (16,), 256, 8, 8, 16384),
    "latent-diffusion vq-f4 (3-dim codes, no attention levels)": (32, (1, 2, 4), 2, (), 256, 3, 3, 8192),
}


@pytest.mark.parametrize("name", list(TAMING))
@pytest.mark.parametrize("yaml_given", [True, False], ids=["with yaml", "without yaml"])
def test_taming_families_import_with_their_own_geometry(tracking_dir, tmp_path, name, yaml_given):
    ch, mult, nrb, attn, res, z, embed, n = TAMING[name]
    state = taming_state(ch, mult, nrb, attn, res, z, embed, n)
    ckpt = lightning_ckpt(tmp_path / "last.ckpt", state)
    extra = []
    if yaml_given:
        target = "ldm.models.autoencoder.VQModel" if "latent" in name else "taming.models.vqgan.VQModel"
        extra = ["--config", taming_yaml(tmp_path / "model.yaml", ch, mult, nrb, attn, res, z, embed, n, target)]
    run_id = imported("--checkpoint", ckpt, *extra)
    params = mlflow.MlflowClient().get_run(run_id).data.params
    if yaml_given:  # the yaml's resolution
        assert params["image_size"] == str(res) and params.get("attn_resolutions", "") == ",".join(map(str, attn))
    elif attn:  # else the size that puts attention at 16x16 features, as in every released model
        assert params["attn_resolutions"] == "16"
    assert (params["ch"], params["ch_mult"], params["z_channels"], params["embed_dim"], params["code_dim"],
            params["codebook_size"]) == (str(ch), ",".join(map(str, mult)), str(z), str(embed), str(embed), str(n))
    # small images: the network is convolutional; attention sits at the same levels at any size
    check_imported(run_id, state, l2=False, image=2 ** len(mult) * 2, embed_dim=embed, n_codes=n,
                   export_as="taming" if yaml_given and name.startswith("taming f16-1024") else None,
                   tmp_path=tmp_path)


LLAMAGEN = {"LlamaGen VQ-16": (32, (1, 1, 2, 2, 4)), "LlamaGen VQ-8": (32, (1, 2, 2, 4))}


@pytest.mark.parametrize("name", list(LLAMAGEN))
@pytest.mark.parametrize("layout", ["release", "training"])
def test_llamagen_families_import_with_their_own_geometry(tracking_dir, tmp_path, name, layout):
    ch, mult = LLAMAGEN[name]
    state = llamagen_state(ch, mult, 2, 256, 8, 16384)
    file = tmp_path / ("vq_ds16_c2i.pt" if layout == "release" else "0250000.pt")
    if layout == "release":
        torch.save({"model": state}, file)
    else:  # vq_train.py: an argparse.Namespace with the training resolution and the lookup
        torch.save({"model": state, "optimizer": {"state": {}}, "discriminator": {"x": torch.zeros(1)}, "steps": 9,
                    "args": argparse.Namespace(vq_model=name.split()[-1], image_size=128, codebook_size=16384,
                                               codebook_embed_dim=8, codebook_l2_norm=True)}, file)
    run_id = imported("--checkpoint", file)
    params = mlflow.MlflowClient().get_run(run_id).data.params
    size = 128 if layout == "training" else 16 * 2 ** (len(mult) - 1)
    assert params["image_size"] == str(size) and params["l2_norm"] == "True"
    assert params["attn_resolutions"] == str(size // 2 ** (len(mult) - 1))
    check_imported(run_id, state, l2=True, image=2 ** len(mult), embed_dim=8, n_codes=16384,
                   export_as="llamagen" if layout == "release" else None, tmp_path=tmp_path)


def random_geometries(n: int, seed: int = 21):
    """Random taming or LlamaGen geometries: code dims 4-256, 1-5 levels, attention per level, 1-3 res blocks."""
    rng = random.Random(seed)
    for i in range(n):
        levels = rng.randint(1, 5)
        fmt = "taming" if i % 2 == 0 else "llamagen"
        yield dict(fmt=fmt, ch=32, ch_mult=tuple(rng.choice((1, 2)) for _ in range(levels)),
                   nrb=rng.randint(1, 3), attn_levels=tuple(j for j in range(levels) if rng.random() < 0.4),
                   z=rng.choice((3, 8, 16, 64)), embed=rng.choice((4, 7, 16, 64, 256)),
                   codes=rng.choice((16, 100, 512)), seed=i)


@pytest.mark.parametrize("geo", list(random_geometries(6)), ids=lambda g: f"{g['fmt']}-{len(g['ch_mult'])}lv")
def test_random_geometries_import_encode_decode_and_round_trip(tracking_dir, tmp_path, geo):
    levels = len(geo["ch_mult"])
    res = 16 * 2 ** (levels - 1)
    if geo["fmt"] == "taming":
        attn = tuple(res // 2 ** j for j in geo["attn_levels"])
        state = taming_state(geo["ch"], geo["ch_mult"], geo["nrb"], attn, res, geo["z"], geo["embed"], geo["codes"],
                             geo["seed"])
        file = lightning_ckpt(tmp_path / "last.ckpt", state)
        extra = ["--config", taming_yaml(tmp_path / "model.yaml", geo["ch"], geo["ch_mult"], geo["nrb"], attn, res,
                                         geo["z"], geo["embed"], geo["codes"])]
    else:
        state = llamagen_state(geo["ch"], geo["ch_mult"], geo["nrb"], geo["z"], geo["embed"], geo["codes"],
                               geo["seed"])
        file = tmp_path / "vq.pt"
        torch.save({"model": state}, file)
        extra = []
    run_id = imported("--checkpoint", file, *extra)
    check_imported(run_id, state, l2=geo["fmt"] == "llamagen", image=2 ** (levels - 1) * 2, embed_dim=geo["embed"],
                   n_codes=geo["codes"], export_as=geo["fmt"], tmp_path=tmp_path)


def test_gumbel_models_are_refused_in_one_line(tracking_dir, tmp_path):
    """taming's vqgan_gumbel_f8 (GumbelQuantize: quantize.proj + quantize.embed) is not supported: said so."""
    state = taming_state(32, (1, 2), 1, (), 32, 8, 8, 16)
    del state["quantize.embedding.weight"]
    state["quantize.embed.weight"] = torch.randn(16, 8)
    state["quantize.proj.weight"] = torch.randn(16, 8, 1, 1)
    res = invoke("import-vqvae", "--checkpoint", lightning_ckpt(tmp_path / "gumbel.ckpt", state))
    assert res.exit_code == 1
    assert "Gumbel-softmax VQGAN" in error_line(res.stderr) and "not supported" in error_line(res.stderr)


def test_init_from_keeps_the_imported_quantizer_geometry(tracking_dir, tmp_path, dataset):
    """train-vqvae --init-from an imported 24-dim-code model keeps its codes (no 8-dim projections appear); an
    option that would change them is a one-line error; --code-dim 0 (= embed_dim) is no change."""
    from core.weights import load_model_weights

    state = taming_state(32, (1, 2, 2), 1, (8,), 32, 48, 24, 96)
    src = imported("--checkpoint", lightning_ckpt(tmp_path / "last.ckpt", state))
    common = ["--manifest", dataset, "--init-from", src, "--perceptual-weight", "0", "--batch-size", "4",
              "--max-steps", "1", "--disc-start", "100", "--val-every", "1", "--ckpt-every", "1", "--val-batches",
              "1", "--num-workers", "0"]
    res = invoke("train-vqvae", *common, "--code-dim", "0")
    assert res.exit_code == 0, res.output
    weights, config, _ = load_model_weights(last_line(res.stdout), "vqvae")
    assert config["code_dim"] == 24 and weights["quantizer.codebook"].shape == (96, 24)
    assert "quantizer.proj_in.weight" not in weights
    res = invoke("train-vqvae", *common, "--code-dim", "8")
    assert res.exit_code == 1
    assert error_line(res.stderr).startswith(f"Error: --code-dim 8 conflicts with the --init-from run {src}")


def test_every_stage_runs_on_an_imported_256_dim_code_tokenizer(tracking_dir, tmp_path, dataset):
    """The released taming geometry (256-dim codes, embed_dim = z_channels, attention at the last level) through
    quantize -> train -> generate -> decode."""
    state = taming_state(32, (1, 2, 2), 1, (4,), 16, 256, 256, 128)
    src = imported("--checkpoint", lightning_ckpt(tmp_path / "last.ckpt", state), "--image-size", "16")
    res = invoke("quantize", "--vqvae-run-id", src, "--manifest", dataset, "--num-workers", "0")
    assert res.exit_code == 0, res.output
    res = invoke("train", "--quantize-run-id", last_line(res.stdout), *TINY_GPT)
    assert res.exit_code == 0, res.output
    res = invoke("generate", "--transformer-run-id", last_line(res.stdout), "--num-samples", "2")
    assert res.exit_code == 0, res.output
    res = invoke("decode", "--run-id", last_line(res.stdout))
    assert res.exit_code == 0, res.output
    assert len(mlflow.MlflowClient().list_artifacts(last_line(res.stdout), "images")) == 2


def test_released_taming_geometry_saved_on_a_gpu_loads_on_cpu(tracking_dir, tmp_path, monkeypatch):
    """A Lightning .ckpt of the f16 geometry (256-dim codes) whose storages are tagged cuda:0, as torch.save writes
    them on a GPU: mapped to the CPU on import."""
    state = taming_state(32, (1, 1, 2, 2, 4), 2, (16,), 256, 256, 256, 1024)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        ckpt = lightning_ckpt(tmp_path / "last.ckpt", state)
    if not torch.cuda.is_available():  # the file really asks for a GPU
        from vqvae.convert import INERT_GLOBALS

        with torch.serialization.safe_globals(INERT_GLOBALS), pytest.raises(RuntimeError, match="CUDA"):
            torch.load(ckpt, weights_only=True)
    run_id = imported("--checkpoint", ckpt)
    check_imported(run_id, state, l2=False, image=32, embed_dim=256, n_codes=1024, export_as=None, tmp_path=tmp_path)


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "not a tokenizer"])
def test_unreadable_official_file_is_one_line(tracking_dir, tmp_path, kind):
    ckpt = lightning_ckpt(tmp_path / "last.ckpt", taming_state(32, (1, 2), 1, (), 32, 8, 8, 16))
    data = ckpt.read_bytes()
    content = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 8,
               "not a tokenizer": None}[kind]
    if content is None:
        torch.save({"state_dict": {"model.weight": torch.zeros(2)}}, ckpt)
    else:
        ckpt.write_bytes(content)
    before = len(mlflow.search_runs(search_all_experiments=True))
    res = invoke("import-vqvae", "--checkpoint", ckpt)
    assert res.exit_code == 1
    line = error_line(res.stderr)
    assert str(ckpt) in line and {"empty": "is empty", "truncated": "truncated or corrupt",
                                  "garbage": "truncated or corrupt", "not a tokenizer": "is not a"}[kind] in line
    assert len(mlflow.search_runs(search_all_experiments=True)) == before  # checked before a run exists
