"""ArcFace's face encoder, for PhotoVerse's face loss and eval.py's optional `face` score.

`IResNet`: ArcFace's backbone (Deng et al. 2019, arXiv 1801.07698; the "improved" ResNet of Duta et al. 2020,
arXiv 2004.04989), mirroring insightface's recognition/arcface_torch/backbones/iresnet.py. Optional: no such
weights are on the Hub in a standard place, so it loads a checkpoint file the user supplies (`IResNet.from_file`),
with its depth (r18 ... r100) read from the file's keys.

Checkpoint contract: module names equal arcface_torch's keys (`conv1.weight`, `layer3.13.bn2.running_var`,
`fc.weight`, `features.weight`), so a `backbone.pth` loads with strict=True.

Shapes: b batch, c channels; aligned faces (b, 3, 112, 112) in [-1, 1], maps (b, c, h, w), embeddings (b, 512).
"""
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange

import hub
from image_encoders import Preprocess, check_pixels


def face_preprocess(size: int = 112) -> Preprocess:  # arcface_torch's inference.py: (img / 255 - 0.5) / 0.5
    return Preprocess(size, size, (0.5,) * 3, (0.5,) * 3)


# ----------------------------------------------------------------------------- IResNet

def conv3x3(c_in, c_out, stride=1):
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus the (downsampled) input."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, eps=1e-5)
        self.conv1 = conv3x3(c_in, c_out)
        self.bn2 = nn.BatchNorm2d(c_out, eps=1e-5)
        self.prelu = nn.PReLU(c_out)
        self.conv2 = conv3x3(c_out, c_out, stride)
        self.bn3 = nn.BatchNorm2d(c_out, eps=1e-5)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


IRESNET_LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}


class IResNet(nn.Module):
    """Aligned 112 x 112 face crops in [-1, 1] -> (b, 512) identity embeddings (compare them by cosine)."""
    size = 112  # four stride-2 stages: 112 -> 7, and `fc` reads the 512 x 7 x 7 map

    def __init__(self, layers=IRESNET_LAYERS["r50"], num_features: int = 512):
        super().__init__()
        self.conv1 = conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        widths = [64, 64, 128, 256, 512]
        for i, n in enumerate(layers):  # each stage halves the map in its first block
            c_in, c_out = widths[i], widths[i + 1]
            blocks = [IBasicBlock(c_in, c_out, stride=2), *(IBasicBlock(c_out, c_out) for _ in range(n - 1))]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    @property
    def preprocess(self) -> Preprocess:
        return face_preprocess(self.size)

    def forward(self, x):
        check_pixels(x, self.size)
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(rearrange(self.bn2(x), "b c h w -> b (c h w)")))

    @classmethod
    def from_file(cls, path, dtype=torch.float32, device="cpu") -> "IResNet":
        """An arcface_torch checkpoint (`backbone.pth`, or .safetensors); the depth is read from its keys."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise hub.ModelLoadError(f"face model '{path}' does not exist: pass an arcface_torch IResNet checkpoint "
                                     f"(such as ms1mv3_arcface_r100_fp16/backbone.pth)")
        sd = hub.read_safetensors(path)[0] if path.suffix == ".safetensors" else hub.read_pickle(path)
        if not isinstance(sd, dict) or "fc.weight" not in sd:
            raise hub.ModelLoadError(f"'{path}' is not an arcface_torch IResNet state dict (no 'fc.weight')")
        layers = [len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
        with torch.device("meta"):
            model = cls(layers, sd["fc.weight"].shape[0])
        hub.check_keys(model, sd, path)
        model.load_state_dict(sd, strict=True, assign=True)
        return model.to(device=device, dtype=dtype).eval()
