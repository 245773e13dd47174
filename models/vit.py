"""A vision transformer for 32x32 images (Dosovitskiy et al., 2021), in full
precision, with named places for low precision.

Patches of 4 pixels (64 tokens and a class token), width 192, 6 blocks of 3
heads, MLP ratio 4: about 2.7M parameters. Attention is computed explicitly
so that its probabilities can be rounded. Each block holds identity modules
where its arithmetic takes low-precision operands; `quantizer_sites` names
them, and a quantizer attached there rounds that operand in the forward pass
and its gradient in the backward pass:

    blocks.<i>.attn.qkv_in     the input of the QKV projection
    blocks.<i>.attn.q, .k      both operands of the scores' matmul
    blocks.<i>.attn.probs, .v  both operands of the probabilities' matmul with V
    blocks.<i>.attn.proj_in    the input of the output projection
    blocks.<i>.mlp.fc1_in      the input of the MLP's first linear layer
    blocks.<i>.mlp.fc2_in      the input of its second

LayerNorm, softmax, GELU and the residual additions stay in float32, as in
the FP8 and MX training recipes; the patch embedding takes the (unrounded)
images and the head's logits stay in full precision, as the CNNs' do.
"""

import torch
import torch.nn as nn


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads, self.scale = heads, (width // heads) ** -0.5
        self.qkv_in, self.qkv = nn.Identity(), nn.Linear(width, 3 * width)
        self.q, self.k, self.probs, self.v = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()
        self.proj_in, self.proj = nn.Identity(), nn.Linear(width, width)

    def forward(self, x):
        batch, tokens, width = x.shape
        qkv = self.qkv(self.qkv_in(x)).reshape(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each batch x heads x tokens x head width
        scores = (self.q(q) * self.scale) @ self.k(k).transpose(-2, -1)
        out = self.probs(scores.softmax(dim=-1)) @ self.v(v)
        return self.proj(self.proj_in(out.transpose(1, 2).reshape(batch, tokens, width)))


class MLP(nn.Module):
    def __init__(self, width, ratio):
        super().__init__()
        self.fc1_in, self.fc1 = nn.Identity(), nn.Linear(width, ratio * width)
        self.act = nn.GELU()
        self.fc2_in, self.fc2 = nn.Identity(), nn.Linear(ratio * width, width)

    def forward(self, x):
        return self.fc2(self.fc2_in(self.act(self.fc1(self.fc1_in(x)))))


class Block(nn.Module):
    def __init__(self, width, heads, ratio):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm2, self.mlp = nn.LayerNorm(width), MLP(width, ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


SITES = ("attn.qkv_in", "attn.q", "attn.k", "attn.probs", "attn.v", "attn.proj_in", "mlp.fc1_in", "mlp.fc2_in")


class VisionTransformer(nn.Module):
    def __init__(self, num_classes=10, image_size=32, patch=4, width=192, depth=6, heads=3, ratio=4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, width))
        self.blocks = nn.Sequential(*[Block(width, heads, ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])

    def quantizer_sites(self, placement):
        """The places of low-precision operands (see the module's docstring),
        for either placement: a transformer has no ReLU after its layers."""
        if placement not in ("layer", "relu"):
            raise ValueError(f"unknown quantizer placement {placement!r}")
        modules = dict(self.named_modules())
        return [modules[f"blocks.{index}.{site}"] for index in range(len(self.blocks)) for site in SITES]
