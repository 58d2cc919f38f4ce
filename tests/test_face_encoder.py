"""face_encoder.py: IResNet's sizes and key names against insightface's, and its forward against arcface_torch's
written out with torch.nn.functional; loading a backbone.pth."""
import pytest
import torch
import torch.nn.functional as F

import hub
from face_encoder import IRESNET_LAYERS, IResNet


def test_iresnet_sizes_and_checkpoint_names():
    with torch.device("meta"):
        r50, r100 = IResNet(IRESNET_LAYERS["r50"]), IResNet(IRESNET_LAYERS["r100"])
    # insightface's model zoo: IResNet-50 43.6M, IResNet-100 65.2M parameters (fc 25088 x 512 included)
    assert round(sum(p.numel() for p in r50.parameters()) / 1e6, 1) == 43.6
    assert round(sum(p.numel() for p in r100.parameters()) / 1e6, 1) == 65.2
    keys = r100.state_dict()
    for k in ["conv1.weight", "bn1.running_mean", "prelu.weight", "layer1.0.downsample.0.weight",
              "layer1.0.downsample.1.num_batches_tracked", "layer3.29.bn3.bias", "layer4.2.conv2.weight",
              "bn2.running_var", "fc.weight", "features.running_var", "features.weight"]:
        assert k in keys, k
    assert "layer1.1.downsample.0.weight" not in keys and keys["fc.weight"].shape == (512, 512 * 7 * 7)


def reference_iresnet(sd, x, layers):
    """arcface_torch's forward written out with torch.nn.functional on the state dict (eval-mode BatchNorm)."""
    def bn(x, p):
        return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            eps=1e-5)
    x = F.prelu(bn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"), sd["prelu.weight"])
    for stage, n in enumerate(layers, start=1):
        for i in range(n):
            p, stride = f"layer{stage}.{i}", 2 if i == 0 else 1
            out = F.prelu(bn(F.conv2d(bn(x, f"{p}.bn1"), sd[f"{p}.conv1.weight"], padding=1), f"{p}.bn2"),
                          sd[f"{p}.prelu.weight"])
            out = bn(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn3")
            x = out + (bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=2), f"{p}.downsample.1") if i == 0 else x)
    x = F.linear(bn(x, "bn2").flatten(1), sd["fc.weight"], sd["fc.bias"])
    return bn(x, "features")


def test_iresnet_loads_an_arcface_torch_file_and_matches_the_reference(tmp_path):
    torch.manual_seed(0)
    layers = (1, 2, 1, 1)
    model = IResNet(layers, num_features=64)
    sd = {k: v + 0.1 * torch.rand_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "backbone.pth")  # arcface_torch saves `backbone.state_dict()` like this
    loaded = IResNet.from_file(tmp_path / "backbone.pth")
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        out = loaded(x)
    assert out.shape == (2, 64)
    assert (out - reference_iresnet(sd, x, layers)).abs().max() < 1e-4 * out.abs().max()
    sd.pop("layer2.1.conv1.weight")
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(hub.ModelLoadError, match=r"missing keys: \[layer2.1.conv1.weight\]"):
        IResNet.from_file(tmp_path / "broken.pth")
    with pytest.raises(hub.ModelLoadError, match="does not exist"):
        IResNet.from_file(tmp_path / "nope.pth")
