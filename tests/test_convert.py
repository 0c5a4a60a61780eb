"""`mgd3 convert-ldm`: a tiny checkpoint in the CompVis latent-diffusion layout (cin256-v2 design),
written by the test from a minimal original-layout UNet (the openaimodel design of the LDM paper:
ResBlocks with a timestep-embedding add, SpatialTransformers with self- and cross-attention and a
GEGLU feed-forward, input/middle/output blocks with skip concatenation), converted, and compared:
the converted model's ε equals the original module's on the same input."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mgd3.backends import load_backend
from mgd3.cli import main
from mgd3.train.convert import UNET_PREFIX, unet_keys

# a cin256-v2 config at toy size: 4 classes + the null class, latent 3x8x8 from a 16x16 VQ autoencoder
UNET = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2, 1],
            num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
            transformer_depth=1, context_dim=16)
DD = dict(double_z=False, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
          num_res_blocks=1, attn_resolutions=[], dropout=0.0)
CONFIG = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "first_stage_key": "image",
    "cond_stage_key": "class_label", "image_size": 8, "channels": 3, "cond_stage_trainable": True,
    "conditioning_key": "crossattn",
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": UNET},
    "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface",
                           "params": {"embed_dim": 3, "n_embed": 64, "ddconfig": DD,
                                      "lossconfig": {"target": "torch.nn.Identity"}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                          "params": {"n_classes": 5, "embed_dim": 16, "key": "class_label"}}}}}


# --------------------------------------------------------------------------- original-layout UNet


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb, context):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    def __init__(self, dim, ctx_dim, heads, head_dim):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(ctx_dim, inner, bias=False)
        self.to_v = nn.Linear(ctx_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, _ = q.shape
        split = lambda z: z.view(b, z.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)  # (B, heads, N, d)
        w = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        out = (w.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class Block(nn.Module):
    def __init__(self, dim, ctx_dim, heads, head_dim):
        super().__init__()
        self.attn1 = Attention(dim, dim, heads, head_dim)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))
        self.attn2 = Attention(dim, ctx_dim, heads, head_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff.net(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, ch, heads, ctx_dim, depth):
        super().__init__()
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(Block(ch, ctx_dim, heads, ch // heads) for _ in range(depth))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, emb, context):
        b, c, h, w = x.shape
        z = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
        for blk in self.transformer_blocks:
            z = blk(z, context)
        return self.proj_out(z.transpose(1, 2).reshape(b, c, h, w)) + x


class Down(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb, context):
        return self.op(x)


class Up(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb, context):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Conv(nn.Conv2d):
    def forward(self, x, emb, context):
        return super().forward(x)


def run_blocks(blocks, x, emb, context):
    for m in blocks:
        x = m(x, emb, context)
    return x


class OriginalUNet(nn.Module):
    """openaimodel.UNetModel, spatial-transformer variant, as the cin256 config builds it."""

    def __init__(self, p):
        super().__init__()
        mc, mults, nres, attn = p["model_channels"], p["channel_mult"], p["num_res_blocks"], p["attention_resolutions"]
        emb, heads, ctx, depth = 4 * mc, p["num_heads"], p["context_dim"], p["transformer_depth"]
        self.mc = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([nn.ModuleList([Conv(p["in_channels"], mc, 3, padding=1)])])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(mults):
            for _ in range(nres):
                layers = [ResBlock(ch, mult * mc, emb)]
                ch = mult * mc
                if ds in attn:
                    layers.append(SpatialTransformer(ch, heads, ctx, depth))
                self.input_blocks.append(nn.ModuleList(layers))
                chans.append(ch)
            if level != len(mults) - 1:
                self.input_blocks.append(nn.ModuleList([Down(ch)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = nn.ModuleList([ResBlock(ch, ch, emb), SpatialTransformer(ch, heads, ctx, depth),
                                           ResBlock(ch, ch, emb)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(mults))[::-1]:
            for i in range(nres + 1):
                layers = [ResBlock(ch + chans.pop(), mc * mult, emb)]
                ch = mc * mult
                if ds in attn:
                    layers.append(SpatialTransformer(ch, heads, ctx, depth))
                if level and i == nres:
                    layers.append(Up(ch))
                    ds //= 2
                self.output_blocks.append(nn.ModuleList(layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, p["out_channels"], 3, padding=1))

    def forward(self, x, t, context):
        emb = self.time_embed(timestep_embedding(t, self.mc))
        hs, h = [], x
        for blocks in self.input_blocks:
            h = run_blocks(blocks, h, emb, context)
            hs.append(h)
        h = run_blocks(self.middle_block, h, emb, context)
        for blocks in self.output_blocks:
            h = run_blocks(blocks, torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


def _vq_state(dd, embed_dim, n_embed, g):
    """first_stage_model.* keys of the CompVis VQ autoencoder (taming Encoder/Decoder), random values."""
    ch, mults, nres, z = dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["z_channels"]
    shapes = {}

    def conv(name, cin, cout, k=3):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(prefix, c):
        res(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for x in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{x}", c, c, 1)
        res(f"{prefix}.mid.block_2", c, c)

    conv("encoder.conv_in", dd["in_channels"], ch)
    cin = ch
    for i, m in enumerate(mults):
        for j in range(nres):
            res(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i != len(mults) - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin)
    mid("encoder", cin)
    norm("encoder.norm_out", cin)
    conv("encoder.conv_out", cin, z)
    conv("quant_conv", z, embed_dim, 1)
    shapes["quantize.embedding.weight"] = (n_embed, embed_dim)
    conv("post_quant_conv", embed_dim, z, 1)
    cin = ch * mults[-1]
    conv("decoder.conv_in", z, cin)
    mid("decoder", cin)
    for i in reversed(range(len(mults))):
        for j in range(nres + 1):
            res(f"decoder.up.{i}.block.{j}", cin, ch * mults[i])
            cin = ch * mults[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin)
    norm("decoder.norm_out", cin)
    conv("decoder.conv_out", cin, dd["out_ch"])
    return {f"first_stage_model.{k}": torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(folder with model.ckpt + config.yaml, the original-layout UNet, the class table)."""
    d = tmp_path_factory.mktemp("compvis")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    unet = OriginalUNet(UNET).eval()
    with torch.no_grad():  # random everywhere (the paper's zero-initialised convs would hide mistakes)
        for prm in unet.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.2)
    table = torch.randn((5, 16), generator=g)
    state = {UNET_PREFIX + k: v.clone() for k, v in unet.state_dict().items()}
    state["cond_stage_model.embedding.weight"] = table
    state.update(_vq_state(DD, 3, 64, g))
    state["model_ema.decay"] = torch.tensor(0.9999)  # other keys of a real checkpoint are ignored
    torch.save({"state_dict": state, "global_step": 1}, d / "model.ckpt")
    (d / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    return d, unet, table


def test_key_list_is_the_original_module_layout(original):
    _, unet, _ = original
    assert unet_keys(UNET) == list(unet.state_dict())


def test_converted_eps_equals_the_original_module(original, tmp_path):
    d, unet, table = original
    out = tmp_path / "ldm"
    names = tmp_path / "names"  # a pipeline folder whose id2label names the classes
    names.mkdir()
    (names / "model_index.json").write_text(json.dumps({"id2label": {str(i): f"n{i}" for i in range(4)}}))
    assert main(["convert-ldm", str(d / "model.ckpt"), "--config", str(d / "config.yaml"), "--out", str(out),
                 "--labels-from", str(names)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "LDMClassConditionalPipeline" and index["vae"] == ["diffusers", "VQModel"]
    b = load_backend(out)
    assert b.num_classes == 4 and b.null_label == 4 and b.latent_shape == (3, 8, 8) and b.resolution == 16
    assert b.vq and b.scaling_factor == 1.0 and not b.learned_sigma and b.id2label[3] == "n3"
    ref = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2  # CompVis "linear"
    assert torch.allclose(torch.from_numpy(b.betas), ref, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((4, 3, 8, 8), generator=g)
    t = torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, 3, 2, 4])  # 4: the null class (the unconditional CFG branch)
    with torch.no_grad():
        want = unet(x, t, table[y][:, None])  # CompVis: ClassEmbedder(y)[:, None] is the context
        got = b.denoiser(x, t, y).eps
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the first stage: the codebook and mapped weights as in the checkpoint
    ckpt = torch.load(d / "model.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(b.vae.quantize.embedding.weight, ckpt["first_stage_model.quantize.embedding.weight"])
    assert torch.equal(b.vae.decoder.up_blocks[0].resnets[0].conv1.weight,
                       ckpt["first_stage_model.decoder.up.1.block.0.conv1.weight"])
    assert torch.equal(b.vae.encoder.mid_block.attentions[0].to_q.weight,
                       ckpt["first_stage_model.encoder.mid.attn_1.q.weight"][:, :, 0, 0])
    assert b.decode(b.encode(torch.rand(2, 3, 16, 16) * 2 - 1)).shape == (2, 3, 16, 16)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mgd3: error: ") and len(err.splitlines()) == 1, err
    return err


def test_partial_or_wrong_checkpoint_is_one_line_naming_the_first_missing_key(original, tmp_path, capsys):
    d, _, _ = original
    state = torch.load(d / "model.ckpt", weights_only=True)["state_dict"]
    cfg = str(d / "config.yaml")

    def convert(st, name):
        torch.save(st, tmp_path / name)
        return main(["convert-ldm", str(tmp_path / name), "--config", cfg, "--out", str(tmp_path / f"{name}-out")])

    partial = dict(state)
    del partial["model.diffusion_model.output_blocks.1.0.skip_connection.weight"]
    del partial["model.diffusion_model.out.2.bias"]
    assert convert(partial, "partial.ckpt") == 2
    assert "key 'model.diffusion_model.output_blocks.1.0.skip_connection.weight' is missing" in _one_line(capsys)
    no_vae = {k: v for k, v in state.items() if not k.startswith("first_stage_model.decoder")}
    assert convert(no_vae, "novae.ckpt") == 2
    assert "key 'first_stage_model.decoder." in _one_line(capsys)
    wrong = dict(state)
    wrong["cond_stage_model.embedding.weight"] = torch.zeros(7, 16)
    assert convert(wrong, "wrong.ckpt") == 2
    assert "has shape (7, 16), the config says (5, 16)" in _one_line(capsys)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert main(["convert-ldm", str(tmp_path / "junk.ckpt"), "--config", cfg, "--out", str(tmp_path / "j")]) == 2
    _one_line(capsys)
    bad = yaml.safe_load(open(cfg))
    bad["model"]["params"]["cond_stage_config"]["target"] = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    (tmp_path / "text.yaml").write_text(yaml.safe_dump(bad))
    assert main(["convert-ldm", str(d / "model.ckpt"), "--config", str(tmp_path / "text.yaml"), "--out",
                 str(tmp_path / "t")]) == 2
    assert "class-conditional" in _one_line(capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("user file")
    assert main(["convert-ldm", str(d / "model.ckpt"), "--config", cfg, "--out", str(tmp_path / "full")]) == 2
    assert "not an empty folder" in _one_line(capsys)
    assert (tmp_path / "full" / "mine.txt").read_text() == "user file"
    assert not any((tmp_path / n).exists() for n in ("j", "t"))
