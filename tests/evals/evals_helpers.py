"""Small offline stand-ins for the evals tests: a cheap feature extractor, a tiny classifier, a tiny random CLIP.

Nothing here is a real network; numbers computed with them check plumbing only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vqsuite.evals.inception import resize_299
from vqsuite.zoo.mini_sd import bytes_to_unicode


class TinyExtractor(nn.Module):
    """A fixed random projection of 4x4-pooled pixels behind the real resize: uint8 [N,3,H,W] -> float32 [N, 16].

    ``forward_resized`` takes the resized float [N, 3, 299, 299] in 0..255, like the real network's."""

    name = "tiny-extractor"
    num_features = 16

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(48, self.num_features, generator=g) / 7)

    def forward_resized(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(x.float() / 128 - 1, 4).flatten(1)
        return torch.tanh(pooled @ self.proj * 3)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_resized(resize_299(images))


class TinyClassifier(nn.Module):
    """conv(3->64) -> pool -> linear(64->64) -> linear(64->10): K multiples of 64 for INT4 g64 groups."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.fc1 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.head(torch.relu(self.fc1(h)))


def tiny_classifier() -> nn.Module:
    return TinyClassifier().eval()


class TinyGen(nn.Module):
    """z [N, 64] -> 3x8x8 images in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 64)
        self.out = nn.Linear(64, 192)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.out(torch.relu(self.fc(z)))).view(-1, 3, 8, 8)


def gen_sample(model: nn.Module, seeds: list[int]) -> torch.Tensor:
    """uint8 images of ``model``, one per seed (a fixed latent per seed)."""
    z = torch.stack([torch.randn(64, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return ((model(z) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised CLIP (32-wide towers, 32x32 images) + processor with a hand-written BPE vocab,
    saved with ``save_pretrained`` to ``folder``. Wiring only: its scores are not CLIP scores."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    tok_dir = folder / "tok"
    tok_dir.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=len(vocab) - 2,
            eos_token_id=len(vocab) - 1,
            pad_token_id=len(vocab) - 1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder
